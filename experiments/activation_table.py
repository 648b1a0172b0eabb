"""Device totals with activations: LLaMA-2-7B on one device and LLaMA-2-70B on 8 processes, from the planner.

    python experiments/activation_table.py   # -> experiments/results/memory_activations.md (a few minutes on a CPU)

Each row is the planner's device total (model state as in ``memory_table.py``, next block prefetched, plus the
activations autograd saves in one training forward, traced on fake tensors) for AdamW and one layer per block.
"""

from __future__ import annotations

import time
from itertools import product

import pandas as pd
from run_summary import RESULTS, arguments, markdown, write_page

from lightning_hift.memory import GIB, estimate_memory, estimate_per_rank

PRECISIONS = {"32-true": "fp32", "bf16-true": "Mixed^Hi (bf16-true)"}
CARD = 24e9  # a 24 GB card, in bytes
PAGE = """# Device totals with activations (planner)

Command: `python experiments/activation_table.py`. GiB of device memory, AdamW, one layer per block, the
next block's state prefetched; activations are what autograd saves in one training forward (Hugging Face
`labels` loss included), traced on fake tensors. Not counted: backward's transient peak, CUDA context and
allocator caching. A 24 GB card holds {card:.2f} GiB.

## LLaMA-2-7B, one device

{single}

The paper's 7B totals (its own batch and length): FPFT fp32 142.11 GB, HiFT fp32 55.41 GB, Mixed^Hi 36.57 GB.

## LLaMA-2-70B, 8 processes, Mixed^Hi (bf16-true), batch 1 per process

{sharded}

Planned in {seconds:.0f} s on this machine.
"""


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def main() -> None:
    args = arguments(__doc__, RESULTS / "memory_activations.md").parse_args()
    start = time.perf_counter()
    single = []
    for precision, seq_len, batch_size, checkpointing in product(PRECISIONS, (512, 2048), (1, 4), (False, True)):
        est = estimate_memory(
            "llama2-7b", precision, batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=checkpointing
        )
        single.append(
            {
                "precision": PRECISIONS[precision],
                "batch": batch_size,
                "seq": seq_len,
                "checkpointing": "on" if checkpointing else "off",
                "FPFT activations": gib(est.fpft.get("activations", "device")),
                "FPFT total": gib(est.fpft.total("device")),
                "HiFT activations": gib(est.hift.get("activations", "device")),
                "HiFT total": gib(est.hift.total("device")),
                "fits 24 GB": "yes" if est.hift.total("device") <= CARD else "no",
            }
        )
        print(single[-1], flush=True)
    sharded = []
    for seq_len, checkpointing in product((512, 2048), (False, True)):
        ranks = estimate_per_rank(
            "llama2-70b", 8, "bf16-true", batch_size=1, seq_len=seq_len, gradient_checkpointing=checkpointing
        ).ranks
        totals = {f"{name} total": gib(ranks[name].total("device")) for name in ("fsdp", "hift_ddp", "hift_fsdp")}
        activations = gib(ranks["hift_fsdp"].get("activations", "device"))
        on = "on" if checkpointing else "off"
        sharded.append({"seq": seq_len, "checkpointing": on, "activations (HiFT)": activations, **totals})
        print(sharded[-1], flush=True)
    tables = {"single": markdown(pd.DataFrame(single)), "sharded": markdown(pd.DataFrame(sharded))}
    write_page(args.out, PAGE.format(card=CARD / GIB, seconds=time.perf_counter() - start, **tables))


if __name__ == "__main__":
    main()

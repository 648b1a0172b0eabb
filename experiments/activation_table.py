"""Device totals with activations: LLaMA-2-7B on one device and LLaMA-2-70B on 8 processes, from the planner.

    python experiments/activation_table.py   # -> experiments/results/memory_activations.md (a few minutes on a CPU)

Each row is the planner's device total (model state as in ``memory_table.py``, next block prefetched, plus the
activations autograd saves in one training forward, traced on fake tensors) for AdamW and one layer per block.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lightning_hift.memory import GIB, estimate_memory, estimate_per_rank

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = {"32-true": "fp32", "bf16-true": "Mixed^Hi (bf16-true)"}
CARD = 24e9  # a 24 GB card, in bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "memory_activations.md")
    args = parser.parse_args()
    start = time.perf_counter()
    lines = [
        "# Device totals with activations (planner)",
        "",
        "Command: `python experiments/activation_table.py`. GiB of device memory, AdamW, one layer per block, the",
        "next block's state prefetched; activations are what autograd saves in one training forward (Hugging Face",
        "`labels` loss included), traced on fake tensors. Not counted: backward's transient peak, CUDA context and",
        "allocator caching. A 24 GB card holds 22.35 GiB.",
        "",
        "## LLaMA-2-7B, one device",
        "",
        "| precision | batch | seq | checkpointing | FPFT activations | FPFT total | HiFT activations | HiFT total |"
        " fits 24 GB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for precision, label in PRECISIONS.items():
        for seq_len in (512, 2048):
            for batch_size in (1, 4):
                for checkpointing in (False, True):
                    est = estimate_memory(
                        "llama2-7b",
                        precision,
                        batch_size=batch_size,
                        seq_len=seq_len,
                        gradient_checkpointing=checkpointing,
                    )
                    cells = [
                        est.fpft.get("activations", "device"),
                        est.fpft.total("device"),
                        est.hift.get("activations", "device"),
                        est.hift.total("device"),
                    ]
                    fits = "yes" if est.hift.total("device") <= CARD else "no"
                    lines.append(
                        f"| {label} | {batch_size} | {seq_len} | {'on' if checkpointing else 'off'} | "
                        + " | ".join(f"{n / GIB:.2f}" for n in cells)
                        + f" | {fits} |"
                    )
                    print(lines[-1], flush=True)
    lines += [
        "",
        "The paper's 7B totals (its own batch and length): FPFT fp32 142.11 GB, HiFT fp32 55.41 GB, Mixed^Hi 36.57 GB.",
        "",
        "## LLaMA-2-70B, 8 processes, Mixed^Hi (bf16-true), batch 1 per process",
        "",
        "| seq | checkpointing | activations (HiFT) | fsdp total | hift_ddp total | hift_fsdp total |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for seq_len in (512, 2048):
        for checkpointing in (False, True):
            ranks = estimate_per_rank(
                "llama2-70b", 8, "bf16-true", batch_size=1, seq_len=seq_len, gradient_checkpointing=checkpointing
            ).ranks
            cells = [ranks["hift_fsdp"].get("activations", "device")]
            cells += [ranks[name].total("device") for name in ("fsdp", "hift_ddp", "hift_fsdp")]
            lines.append(
                f"| {seq_len} | {'on' if checkpointing else 'off'} | "
                + " | ".join(f"{n / GIB:.2f}" for n in cells)
                + " |"
            )
            print(lines[-1], flush=True)
    lines += ["", f"Planned in {time.perf_counter() - start:.0f} s on this machine."]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Per-process model-state memory of LLaMA-2 shapes on N processes, from the memory planner: the table of
docs/guide/fsdp.md.

    python experiments/memory_table.py        # prints a markdown table (about 30 s: 70B is built on the meta device)

Columns (what each holds: docs/guide/fsdp.md) are GiB of device memory per process. FSDP is Lightning's FSDP full
fine-tuning: fp32 is also its ``bf16-mixed`` state; its ``bf16-true`` row has bf16 weights and state, no masters.
"""

from __future__ import annotations

from itertools import product

import pandas as pd
from run_summary import markdown

from lightning_hift.memory import GIB, SHARDED_STRATEGIES, estimate_per_rank

SHAPES = ("llama2-7b", "llama2-13b", "llama2-70b")
WORLD_SIZES = (1, 2, 8, 64)
PRECISIONS = {"32-true": "fp32", "bf16-true": "Mixed^Hi (bf16-true)"}


def main() -> None:
    rows = []
    for shape, world_size, (precision, label) in product(SHAPES, WORLD_SIZES, PRECISIONS.items()):
        ranks = estimate_per_rank(shape, world_size, precision).ranks
        totals = {name: f"{ranks[name].total('device') / GIB:.1f}" for name in SHARDED_STRATEGIES}
        host = f"{ranks['hift_fsdp'].total('host') / GIB:.1f}"
        rows.append({"model": shape, "N": world_size, "precision": label, **totals, "hift_fsdp host": host})
    print(markdown(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()

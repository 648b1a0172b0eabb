"""Per-process model-state memory of LLaMA-2 shapes on N processes: the table of docs/guide/fsdp.md, from the memory planner.

    python experiments/memory_table.py        # prints a markdown table (about 30 s: 70B is built on the meta device)

Columns are GiB of device memory per process (weights, gradients, optimizer state, fp32 masters, and for the FSDP
columns one gathered unit with its gradient), AdamW, one layer per block, the next block's state prefetched. FSDP is
Lightning's FSDP full fine-tuning: under fp32 its state is that of ``bf16-mixed`` too (fp32 weights, gradients and
state, sharded); its ``bf16-true`` row trains bf16 weights with bf16 state, without masters (updates below half a
bf16 step are lost).
"""

from __future__ import annotations

from lightning_hift.memory import GIB, SHARDED_STRATEGIES, estimate_per_rank

SHAPES = ("llama2-7b", "llama2-13b", "llama2-70b")
WORLD_SIZES = (1, 2, 8, 64)
PRECISIONS = {"32-true": "fp32", "bf16-true": "Mixed^Hi (bf16-true)"}


def main() -> None:
    print("| model | N | precision | " + " | ".join(SHARDED_STRATEGIES) + " | hift_fsdp host |")
    print("|---|---|---|" + "---|" * (len(SHARDED_STRATEGIES) + 1))
    for shape in SHAPES:
        for world_size in WORLD_SIZES:
            for precision, label in PRECISIONS.items():
                ranks = estimate_per_rank(shape, world_size, precision).ranks
                cells = [f"{ranks[name].total('device') / GIB:.1f}" for name in SHARDED_STRATEGIES]
                cells.append(f"{ranks['hift_fsdp'].total('host') / GIB:.1f}")
                print(f"| {shape} | {world_size} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

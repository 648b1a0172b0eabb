"""Peak accelerator memory of full fine-tuning vs HiFT, beside the planner and the HiFT paper.

    python experiments/gpu_memory.py --shape 7b --batch-size 1 --seq-len 512      # one CUDA GPU, a few minutes
    python experiments/gpu_memory.py --shape tiny --device cpu                   # smoke run of the same code

For each precision (32-true, bf16-mixed, bf16-true) and method (FPFT with Lightning's default strategy, HiFT
with one layer per block and offloaded optimizer state) a random-init LLaMA of the chosen shape trains for one
whole HiFT cycle (k optimizer steps, k = number of blocks) on random tokens with AdamW, and the peak of
``torch.cuda.max_memory_allocated`` over those steps is printed beside the planner's model-state estimate
(``lightning_hift.estimate_memory``, which leaves activations out) and the paper's totals for LLaMA-2-7B. A run
that does not fit prints OOM. Writes the table to ``--out`` as Markdown.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_hift
from lightning_hift.memory import GIB, estimate_memory

SHAPES = {
    "7b": LlamaConfig(),  # transformers' defaults are LLaMA-2-7B's shape
    "1b": LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32),
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
    ),
}
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
# Paper (LLaMA-2-7B, AdamW, E2E): total GiB, including activations and its own residual memory.
PAPER_7B = {("32-true", "fpft"): 142.11, ("32-true", "hift"): 55.41, ("bf16-true", "hift"): 36.57}


class RandomTokensLM(LightningModule):
    def __init__(self, config: LlamaConfig, batch_size: int, seq_len: int, steps: int) -> None:
        super().__init__()
        self.config, self.batch_size, self.seq_len, self.steps = config, batch_size, seq_len, steps
        self.model: LlamaForCausalLM | None = None

    def configure_model(self) -> None:
        # Built here so that the precision plugin's init context makes the weights in their final dtype.
        if self.model is None:
            self.model = LlamaForCausalLM(self.config)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def train_dataloader(self) -> DataLoader:
        tokens = torch.randint(0, self.config.vocab_size, (self.steps * self.batch_size, self.seq_len))
        return DataLoader(TensorDataset(tokens), batch_size=self.batch_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-5)


def measure(args: argparse.Namespace, precision: str, method: str, steps: int) -> float | None:
    """Peak bytes over ``steps`` optimizer steps, or None when the run does not fit."""
    strategy = lightning_hift.HiFTStrategy() if method == "hift" else "auto"
    module = RandomTokensLM(SHAPES[args.shape], args.batch_size, args.seq_len, steps)
    trainer = Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        strategy=strategy,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module)
    except torch.OutOfMemoryError:
        return None
    finally:
        del module, trainer
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()  # between runs only, never inside a training loop
    if args.device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/gpu_memory.md"))
    args = parser.parse_args()
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(SHAPES[args.shape])
    rows = []
    for precision in args.precisions:
        planner = estimate_memory(meta_model, precision, "adamw")
        for method in ("fpft", "hift"):
            started = time.perf_counter()
            peak = measure(args, precision, method, steps=planner.num_blocks)
            planned = (planner.fpft if method == "fpft" else planner.hift).total("device")
            paper = PAPER_7B.get((precision, method)) if args.shape == "7b" else None
            rows.append((precision, method, peak, planned, paper, time.perf_counter() - started))
            print(rows[-1], flush=True)
    place = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (peak RSS of the process)"
    lines = [
        f"Shape {args.shape} ({planner.num_params / 1e6:,.0f} M params, {planner.num_blocks} blocks), batch"
        f" {args.batch_size}, sequence {args.seq_len}, AdamW, one HiFT cycle of {planner.num_blocks} steps; {place}.",
        "",
        "| precision | method | measured peak GiB | planner model states GiB | paper total GiB | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for precision, method, peak, planned, paper, seconds in rows:
        measured = "OOM" if peak is None else f"{peak / GIB:.2f}"
        reported = "" if paper is None else f"{paper:.2f}"
        lines.append(f"| {precision} | {method} | {measured} | {planned / GIB:.2f} | {reported} | {seconds:.0f} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()

"""Peak accelerator memory of full fine-tuning vs HiFT, beside the planner and the HiFT paper.

    python experiments/gpu_memory.py --shape 7b --batch-size 1 --seq-len 512      # one CUDA GPU, a few minutes
    python experiments/gpu_memory.py --shape tiny --device cpu                   # smoke run of the same code

For each precision and method a random-init LLaMA trains one HiFT cycle on random tokens with AdamW, in its own
process; its peak ``torch.cuda.max_memory_allocated`` (or OOM) goes beside the planner's estimate and the paper's
LLaMA-2-7B totals, the table at ``--out`` rewritten after each row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import pandas as pd
import torch
from lightning.pytorch import LightningModule
from run_summary import RESULTS, arguments, markdown, peak_memory, quiet_trainer
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_hift
from lightning_hift.memory import GIB, estimate_memory
from lightning_hift.transfer import HOST

SHAPES = {
    "7b": LlamaConfig(),  # transformers' defaults are LLaMA-2-7B's shape
    "1b": LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32),
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
    ),
}
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
METHODS = ("fpft", "hift", "hift_fsdp")
# Paper (LLaMA-2-7B, AdamW, E2E): total GiB, including activations and its own residual memory.
PAPER_7B = {("32-true", "fpft"): 142.11, ("32-true", "hift"): 55.41, ("bf16-true", "hift"): 36.57}
COLUMNS = ["precision", "method", "measured peak GiB", "planner total GiB", "planner model states GiB"]
COLUMNS += ["paper total GiB", "host peak GiB", "seconds"]


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
    strategies = {"hift": lightning_hift.HiFTStrategy, "hift_fsdp": lightning_hift.HiFTFSDPStrategy}
    strategy = strategies.get(method, lambda: "auto")()
    module = RandomTokensLM(SHAPES[args.shape], args.batch_size, args.seq_len, steps)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    trainer = quiet_trainer(accelerator=accelerator, devices=1, strategy=strategy, precision=precision, max_steps=steps)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module)
    except torch.OutOfMemoryError:
        return None
    if args.device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return host_peak()


def host_peak() -> float:
    return float(peak_memory(HOST)["peak_rss_bytes"])


def run_one(args: argparse.Namespace) -> None:
    precision, method = args.run_one.split("/")
    peak = measure(args, precision, method, steps=args.steps)
    print(json.dumps({"peak": peak, "host_peak": host_peak()}), flush=True)


def spawn(args: argparse.Namespace, precision: str, method: str, steps: int) -> dict[str, Any]:
    """Measure in a fresh process: what one run leaves in host memory at teardown cannot kill the next."""
    options = ["--shape", args.shape, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    command = [sys.executable, __file__, "--run-one", f"{precision}/{method}", "--steps", str(steps), *options]
    child = subprocess.run([*command, "--device", args.device], stdout=subprocess.PIPE, text=True, check=False)
    results = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not results:
        return {"failed": f"exit code {child.returncode}" + (" (killed: host memory?)" if child.returncode < 0 else "")}
    result: dict[str, Any] = json.loads(results[-1])
    return result


def gib(nbytes: float | None) -> str:
    return "OOM" if nbytes is None else f"{nbytes / GIB:.2f}"


def main() -> None:
    parser = arguments(__doc__, RESULTS / "gpu_memory.md")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument(
        "--methods", nargs="+", default=["fpft", "hift"], choices=METHODS, help="hift_fsdp: one process"
    )
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        run_one(args)
        return
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(SHAPES[args.shape])
    place = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (peak RSS of the process)"
    rows: list[dict[str, str]] = []
    for precision in args.precisions:
        planner = estimate_memory(meta_model, precision, "adamw", batch_size=args.batch_size, seq_len=args.seq_len)
        for method in args.methods:
            started = time.perf_counter()
            result = spawn(args, precision, method, steps=planner.num_blocks)
            # hift_fsdp on one process shards nothing: the planner's HiFT figure (estimate_per_rank at N = 1).
            breakdown = planner.fpft if method == "fpft" else planner.hift
            paper = PAPER_7B.get((precision, method)) if args.shape == "7b" else None
            failed = result.get("failed")
            rows.append(
                {
                    "precision": precision,
                    "method": method,
                    "measured peak GiB": failed or gib(result["peak"]),
                    "planner total GiB": gib(breakdown.total("device")),
                    "planner model states GiB": gib(breakdown.total("device") - breakdown.get("activations", "device")),
                    "paper total GiB": "" if paper is None else f"{paper:.2f}",
                    "host peak GiB": "" if failed else gib(result["host_peak"]),
                    "seconds": f"{time.perf_counter() - started:.0f}",
                }
            )
            print(rows[-1], flush=True)
            table = (
                f"Shape {args.shape} ({planner.num_params / 1e6:,.0f} M params, {planner.num_blocks} blocks), batch"
                f" {args.batch_size}, sequence {args.seq_len}, AdamW, one HiFT cycle of {planner.num_blocks} steps;"
                f" {place}. Each row runs in its own process.\n\n" + markdown(pd.DataFrame(rows, columns=COLUMNS))
            )
            # After every row: a long run that stops keeps what it measured.
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

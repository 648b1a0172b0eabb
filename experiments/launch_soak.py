"""Repeated multi-process launches under load: does a process ever die as it exits?

    python experiments/launch_soak.py --launches 60 --parallel 3 --load 2
    python experiments/launch_soak.py --strategies hift_fsdp_spawn --launches 10   # a quick look

Each launch is a fresh interpreter fitting a small module on two gloo processes, with ``--parallel`` launches at once
and ``--load`` busy processes competing for the cores: where ``hift_fsdp_spawn`` once aborted at exit (SIGABRT). The
page (experiments/results/launch_soak.md) counts launches that exit with a code other than 0 or abort.
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import torch
from lightning.pytorch import LightningModule
from run_summary import RESULTS, arguments, markdown, quiet_trainer, write_page
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_hift  # noqa: F401  (registers the strategy names)

ABORT_MARKS = ("terminate called", "SIGABRT", "core dumped")


class Small(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs), labels)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 16, generator=generator), torch.randint(0, 4, (64,), generator=generator))
        return DataLoader(data, batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def busy() -> None:
    while True:
        pass


def launch(strategy: str) -> tuple[str, int, bool, float, str]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--child", strategy], capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    aborted = any(mark in output for mark in ABORT_MARKS)
    return strategy, result.returncode, aborted, time.perf_counter() - start, output


def main() -> None:
    parser = arguments(__doc__, RESULTS / "launch_soak.md")
    parser.add_argument("--strategies", nargs="+", default=["hift_fsdp_spawn", "hift_ddp_spawn"])
    parser.add_argument("--launches", type=int, default=20, help="launches per strategy")
    parser.add_argument("--parallel", type=int, default=3, help="launches running at once")
    parser.add_argument("--load", type=int, default=2, help="busy processes competing for the cores")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        quiet_trainer(strategy=args.child, accelerator="cpu", devices=2, max_steps=6).fit(Small())
        return
    hogs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.load)]
    for hog in hogs:
        hog.start()
    try:
        plan = [strategy for _ in range(args.launches) for strategy in args.strategies]
        with ThreadPoolExecutor(args.parallel) as pool:
            outcomes = list(pool.map(launch, plan))
    finally:
        for hog in hogs:
            hog.terminate()
    runs = pd.DataFrame(outcomes, columns=["strategy", "code", "aborted", "seconds", "output"])
    runs["failed"] = runs.code != 0
    by = runs.groupby("strategy")
    table = pd.DataFrame(
        {
            "launches": by.size(),
            "exit code not 0": by.failed.sum(),
            "aborted at exit": by.aborted.sum(),
            "median s per launch": by.seconds.median().map("{:.1f}".format),
        }
    ).reindex(args.strategies)
    lines = [
        f"Launches under load: {args.parallel} at once, {args.load} busy processes, two gloo processes each"
        f" (`python experiments/launch_soak.py --launches {args.launches} --parallel {args.parallel}"
        f" --load {args.load}`).",
        "",
        markdown(table.rename_axis("strategy").reset_index()),
    ]
    failures = runs[runs.failed | runs.aborted]
    if len(failures):
        lines += ["", "The end of each failed launch's output:", ""]
        for failure in failures.itertuples():
            tail = "\n".join(failure.output.splitlines()[-15:])
            lines.append(f"{failure.strategy}, exit code {failure.code}:\n\n```\n{tail}\n```")
    write_page(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

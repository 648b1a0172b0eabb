"""HiFT across processes against Lightning's DDP and FSDP: seconds per optimizer step and bytes sent per step.

    python experiments/ddp_benchmark.py                         # MiniLM, balanced tweets, 2 CPU processes (gloo)
    python experiments/ddp_benchmark.py --steps 8 --out /tmp/x  # a quick look

Every method has the same model, data and global batch; ``fsdp`` is full fine-tuning on ModelParallelStrategy, sharded
by unit as ``hift_fsdp`` shards it. The page is ``--out``/ddp.md, each run's figures ``--out``/ddp_runs/METHOD.json.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from run_summary import RESULTS, arguments, markdown, timed_fit, write_page

from lightning_hift import HiFTDDPStrategy, HiFTFSDPStrategy, HiFTStrategy
from lightning_hift.fsdp import gathering_launcher, shard_by_unit
from lightning_hift.tasks import SequenceClassifier, StepTimer, TweetSentimentDataModule

METHODS = ("ddp", "hift_ddp_m1", "hift_ddp_m2", "fsdp", "hift_fsdp_m1", "single_full", "single_hift_m1")
COLLECTIVES = {
    "all_reduce": ("grads", 0, "tensor"),
    "reduce_scatter_single": ("grads", 1, "input"),
    "all_gather_single": ("gathered", 1, "input_tensor"),
}  # the calls counted: what they send, and where the sent tensor is among their arguments


# No `from __future__ import annotations` in this file: DDP checks the hook's annotations at run time.
def counting_allreduce_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    tensor = bucket.buffer().div_(dist.get_world_size())
    work = dist.all_reduce(tensor, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


class CountedDDPStrategy(DDPStrategy):
    """Lightning's DDP, its buckets sent through the counted all-reduce (on CPU too)."""

    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        self.model.register_comm_hook(None, counting_allreduce_hook)


class ShardedClassifier(SequenceClassifier):
    def configure_model(self) -> None:
        shard_by_unit(self, self.device_mesh["data_parallel"])


class SpawnedModelParallel(ModelParallelStrategy):
    """Started with ``spawn``, so that one script runs several methods in turn."""

    def _configure_launcher(self) -> None:
        self._launcher = gathering_launcher(self, "spawn")


class TrafficMeter(Callback):
    """Counts the bytes of the collectives made during training batches; rank 0 writes the figures as JSON."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.bytes = {"grads": 0, "gathered": 0}
        self._in_batch = False
        self._originals: dict[str, Any] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for name, (kind, position, keyword) in COLLECTIVES.items():
            original = self._originals[name] = getattr(dist, name)

            def counting(*args: Any, _call: Any = original, _at: tuple = (kind, position, keyword), **kw: Any) -> Any:
                if self._in_batch:
                    counted, index, key = _at
                    self.bytes[counted] += (args[index] if len(args) > index else kw[key]).nbytes
                return _call(*args, **kw)

            setattr(dist, name, counting)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals = {}

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._in_batch = True

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._in_batch = False

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        steps = max(1, trainer.global_step)
        record = {
            "steps": trainer.global_step,
            "processes": trainer.world_size,
            "threads": torch.get_num_threads(),
            "median_s_per_step": next(c for c in trainer.callbacks if isinstance(c, StepTimer)).median_seconds,
            "bytes_per_step": self.bytes["grads"] / steps,
            "gathered_bytes_per_step": self.bytes["gathered"] / steps,
            "all_grad_bytes": sum(p.numel() * p.element_size() for p in pl_module.parameters()),
            "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        }
        Path(self.path).write_text(json.dumps(record))


def make_strategy(method: str, processes: int) -> Strategy | str:
    kind, _, blocks = method.rpartition("_m") if "hift" in method else (method, "", "0")
    m = int(blocks)  # layers per block
    return {
        "ddp": lambda: CountedDDPStrategy(start_method="spawn"),
        "hift_ddp": lambda: HiFTDDPStrategy(layers_per_block=m, start_method="spawn"),
        "fsdp": lambda: SpawnedModelParallel(data_parallel_size=processes, tensor_parallel_size=1),
        "hift_fsdp": lambda: HiFTFSDPStrategy(layers_per_block=m, start_method="spawn"),
        "single_hift": lambda: HiFTStrategy(layers_per_block=m),
        "single_full": lambda: "auto",
    }[kind]()


def run(method: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    processes = 1 if method.startswith("single") else args.processes
    seed_everything(args.seed)
    lr = args.hift_lr if "hift" in method else args.full_lr
    batch_size = args.batch_size * args.processes // processes
    data = TweetSentimentDataModule(tokenizer=args.model, batch_size=batch_size, seed=args.seed)
    module = (ShardedClassifier if method == "fsdp" else SequenceClassifier)(args.model, data.num_classes, lr=lr)
    path = out / "ddp_runs" / f"{method}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meter = TrafficMeter(str(path))
    settings = {"strategy": make_strategy(method, processes), "max_steps": args.steps, "limit_val_batches": 0}
    _, _, seconds = timed_fit(
        module, data, callbacks=[meter], accelerator="cpu", devices=processes, num_sanity_val_steps=0, **settings
    )
    record = {**json.loads(path.read_text()), "method": method, "wall_s": seconds, "lr": lr}
    path.write_text(json.dumps(record))
    return record


def table(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    runs = pd.DataFrame([{"gathered_bytes_per_step": 0, **record} for record in records])
    ddp = runs.set_index("method").reindex(["ddp"]).iloc[0]  # NaN without a DDP row: its ratios read "-"
    many = runs.processes > 1  # one-process rows send nothing

    def cells(values: pd.Series, pattern: str, where: pd.Series | bool = True) -> pd.Series:
        return values.map(pattern.format).where(values.notna() & where, "-")

    columns = {
        "method": runs.method,
        "processes x threads": runs.processes.astype(str) + " x " + runs.threads.astype(str),
        "global batch": args.batch_size * args.processes,
        "median s/step": cells(runs.median_s_per_step, "{:.3f}"),
        "time vs DDP": cells(runs.median_s_per_step / ddp.median_s_per_step, "{:.2f}x"),
        "MiB grads/step": cells(runs.bytes_per_step / 2**20, "{:.1f}", many),
        "grads vs DDP": cells(runs.bytes_per_step / ddp.bytes_per_step, "{:.3f}x", many),
        "MiB gathered/step": cells(runs.gathered_bytes_per_step / 2**20, "{:.1f}", many),
    }
    return markdown(pd.DataFrame(columns))


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, RESULTS)
    parser.add_argument("--model", default="minilm", help="'minilm' (offline) or a model folder")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--hift-lr", type=float, default=5e-5, help="times the blocks in each update (lr_scale)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="rewrite ddp.md from the saved ddp_runs/*.json")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = {path.stem: json.loads(path.read_text()) for path in (args.out / "ddp_runs").glob("*.json")}
        records = [{"method": method, **saved[method]} for method in args.methods if method in saved]
    else:
        records = [run(method, args, args.out) for method in args.methods]
    given = [arg for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--report-only"]
    command = "python experiments/ddp_benchmark.py " + " ".join(given)
    report = (
        "# HiFT on several processes vs Lightning DDP and FSDP (full fine-tuning)\n\n"
        f"Command: `{command.strip()}`  \n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, gloo.  \n"
        f"Model: {args.model}; {args.steps} optimizer steps; batch {args.batch_size} per process.\n\n"
        f"{table(records, args)}\n\n"
        "MiB grads/step: gradient bytes a process sends per optimizer step during training batches (rank 0; passed to"
        " torch.distributed.all_reduce, or reduce_scatter_single under FSDP2; all gradients:"
        f" {records[0]['all_grad_bytes'] / 2**20:.1f} MiB). MiB gathered/step: weight bytes a process contributes to"
        " all_gather_single, FSDP2 gathering each unit for its forward and again for its backward. Time and grads"
        " vs DDP: this row's over the DDP row's (below 1 is faster, or less). One-process rows use both cores in one"
        " process.\n"
    )
    write_page(args.out / "ddp.md", report)


if __name__ == "__main__":
    main()

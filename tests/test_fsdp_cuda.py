"""hift_fsdp on a CUDA device, world size 1: where the sharded state really lives. Skipped without a GPU.

Each run is a fresh Python process (``python -c``), so that its process group and CUDA state cannot leak into the
test session, and so that ``TORCH_CUDA_SANITIZER`` can be set before torch is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.lightning import Callback, HiFTFSDPStrategy, LightningModule, Trainer, seed_everything
from tests.helpers.modules import SkipOnce, quiet_trainer
from tests.test_strategy_cuda import BusyBeforeTheStep

ROOT = Path(__file__).resolve().parent.parent
RESULTS = os.environ.get("HIFT_GPU_RESULTS")  # gpu_check.sh points it at experiments/results

pytestmark = pytest.mark.gpu

BLOCKS = 8  # DeepModule's eight layers, one per block
WIDTH = 1024


class DeepModule(LightningModule):
    """Eight 1024-wide layers under AdamW: a block's fp32 state is 12 MiB (master and two moments), 96 MiB in all."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(BLOCKS))

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (x,) = batch
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.float().pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(torch.randn(96, WIDTH, generator=torch.Generator().manual_seed(0)))
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed  # resume at the next batch
        return DataLoader(data, batch_size=8, sampler=SkipOnce(range(len(data)), done * 8))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _local(value: Tensor) -> Tensor:
    return value.to_local() if isinstance(value, DTensor) else value


class ShardPlacementProbe(Callback):
    """After every step from the second cycle on: the active block's masters and optimizer state are on the device,
    every waiting block's are in pinned host memory, and the bf16 weights never leave the device. Read from each
    DTensor's own local shard, not from the strategy's bookkeeping."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step <= BLOCKS:
            return
        strategy: Any = trainer.strategy
        state = trainer.optimizers[0].state
        device = strategy.root_device.type  # "cuda"; "cpu" only where the script is tried out without a GPU
        for block in strategy.blocks:
            active = block.index == strategy.active_block
            for param, master in zip(block.params, strategy.masters.masters(block), strict=True):
                assert _local(param).device.type == device and param.dtype == torch.bfloat16
                kept = [_local(master)] + [_local(v) for k, v in state.get(master, {}).items() if k != "step"]
                assert len(kept) == 3, (block.index, sorted(state.get(master, {})))  # master, exp_avg, exp_avg_sq
                for tensor in kept:
                    assert tensor.dtype == torch.float32
                    if active:
                        assert tensor.device.type == device, (block.index, "active", tensor.device)
                    else:
                        assert tensor.device.type == "cpu", (block.index, tensor.device)
                        assert tensor.is_pinned() or device == "cpu", (block.index, "not pinned")
                    self.checked += 1


class CycleSnapshot(Callback):
    """Records the CUDA allocator's history over the second cycle and the peak bytes allocated in it."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.peak = 0
        self.at_start = 0

    def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step == BLOCKS:
            from lightning_hift.packages import private

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.at_start = torch.cuda.memory_allocated()
            private("torch.cuda.memory", "_record_memory_history")(max_entries=200_000)

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step == 2 * BLOCKS:
            from lightning_hift.packages import private

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            private("torch.cuda.memory", "_dump_snapshot")(str(self.out))
            private("torch.cuda.memory", "_record_memory_history")(enabled=None)


def fit_sharded(
    steps: int, report: str | None = None, snapshot: str | None = None, accelerator: str = "gpu", **fit: Any
) -> None:
    """One hift_fsdp fit in bf16-true on one device; writes the final weights and what the probes saw to ``report``."""
    seed_everything(0)
    module = DeepModule()
    probe = ShardPlacementProbe()
    callbacks: list[Callback] = [probe, *fit.pop("callbacks", [])]
    if accelerator == "gpu":
        callbacks.append(BusyBeforeTheStep())
    recorder = CycleSnapshot(Path(snapshot)) if snapshot else None
    if recorder is not None:
        callbacks.append(recorder)
    ckpt_path = fit.pop("ckpt_path", None)
    trainer = quiet_trainer(
        accelerator=accelerator,
        devices=1,
        strategy=HiFTFSDPStrategy(),
        precision="bf16-true",
        max_steps=steps,
        callbacks=callbacks,
        use_distributed_sampler=False,  # one process; the module's sampler resumes mid-epoch
        **fit,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    if report is None:
        return
    strategy: Any = trainer.strategy
    weights = [_local(p).detach().float().cpu() for p in module.parameters()]
    block_bytes = max(sum(4 * _local(p).numel() for p in block.params) for block in strategy.blocks)
    torch.save(
        {
            "weights": weights,
            "checked": probe.checked,
            "peak": recorder.peak if recorder else 0,
            "at_start": recorder.at_start if recorder else 0,
            "block_fp32_bytes": block_bytes,
            "all_fp32_bytes": sum(4 * _local(p).numel() for p in module.parameters()),
        },
        report,
    )


def _in_a_fresh_process(call: str, sanitizer: bool = False) -> subprocess.CompletedProcess[str]:
    script = f"from tests.test_fsdp_cuda import fit_sharded\n{call}\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if sanitizer:
        env["TORCH_CUDA_SANITIZER"] = "1"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_waiting_blocks_state_and_masters_rest_in_pinned_host_memory_and_a_cycle_holds_one_blocks_worth(
    tmp_path: Path,
) -> None:
    snapshot = Path(RESULTS) / "gpu_fsdp_cycle_snapshot.pickle" if RESULTS else tmp_path / "cycle.pickle"
    report = tmp_path / "report.pt"
    steps = 3 * BLOCKS
    _in_a_fresh_process(f"fit_sharded({steps}, report={str(report)!r}, snapshot={str(snapshot)!r})")
    seen = torch.load(report, weights_only=True)
    # steps checked x blocks x (weight, bias) x (master, two moments)
    assert seen["checked"] == (steps - BLOCKS) * BLOCKS * 2 * 3
    assert snapshot.stat().st_size > 0
    # At most on the device in the cycle, in blocks' fp32 worth: the bf16 weights (BLOCKS / 2), the active block's
    # master, moments and fp32 and bf16 gradients (4.5), the next block's master and moments coming in (3), the last
    # block's going out (3), and small activations. With every block's state on the device the masters and moments
    # alone would be 3 x BLOCKS.
    one_block = seen["block_fp32_bytes"]
    bound = seen["all_fp32_bytes"] // 2 + 11 * one_block - one_block // 2 + 4 * 2**20
    assert bound < 3 * seen["all_fp32_bytes"]
    assert seen["peak"] <= bound, (seen["peak"], bound)
    if RESULTS:
        line = {key: seen[key] for key in ("peak", "at_start", "block_fp32_bytes", "all_fp32_bytes")}
        (Path(RESULTS) / "gpu_fsdp_cycle.json").write_text(json.dumps({**line, "bound": bound}, indent=1) + "\n")


def test_a_consolidated_checkpoint_resumes_on_the_device_bit_for_bit(tmp_path: Path) -> None:
    # Saving gathers the sharded masters and state from host and device onto process 0 (here the only one).
    whole, cut, resumed = tmp_path / "whole.pt", tmp_path / "cut.pt", tmp_path / "resumed.pt"
    checkpoint = f"ModelCheckpoint(dirpath={str(tmp_path)!r}, filename='{{step}}', every_n_train_steps=11)"
    _in_a_fresh_process(  # cut at step 11: mid-cycle, mid-epoch
        "from tests.helpers.lightning import ModelCheckpoint\n"
        f"fit_sharded(20, report={str(whole)!r})\n"
        f"fit_sharded(11, report={str(cut)!r}, callbacks=[{checkpoint}], enable_checkpointing=True)\n"
        f"fit_sharded(20, report={str(resumed)!r}, ckpt_path={str(tmp_path / 'step=11.ckpt')!r})"
    )
    saved = torch.load(tmp_path / "step=11.ckpt", weights_only=True)
    assert all(t.device.type == "cpu" for t in saved["state_dict"].values())
    for a, b in zip(torch.load(whole)["weights"], torch.load(resumed)["weights"], strict=True):
        assert torch.equal(a, b)


def test_the_cuda_sanitizer_finds_no_race_in_a_hift_fsdp_run() -> None:
    result = _in_a_fresh_process("fit_sharded(10)", sanitizer=True)
    assert "CSAN" not in result.stderr, result.stderr[-4000:]

"""Where tensors really live on a CUDA device. Skipped on machines without one."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_hift.memory import snapshot
from lightning_hift.transfer import ALIGN
from tests.helpers.lightning import Callback, HiFTStrategy, LightningModule, ModelCheckpoint, Trainer, seed_everything
from tests.helpers.modules import SkipOnce, TinyModule, quiet_trainer

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.gpu


class PlacementProbe(Callback):
    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        strategy = trainer.strategy
        assert isinstance(strategy, HiFTStrategy)
        state = trainer.optimizers[0].state
        for block in strategy.blocks:
            for p in block.params:
                assert p.device.type == "cuda"
                assert (p.grad is None) or block.index == strategy.active_block
                for key, value in state.get(p, {}).items():
                    if key == "step" or not isinstance(value, torch.Tensor):
                        continue
                    if block.index == strategy.active_block:
                        assert value.device.type == "cuda"
                    else:
                        assert value.device.type == "cpu" and value.is_pinned(), (block.index, key)
                    self.checked += 1


@pytest.mark.parametrize("optimizer", ["adamw", "adagrad"])
def test_offloaded_state_is_pinned_host_memory_and_the_active_block_is_on_the_device(optimizer: str) -> None:
    probe = PlacementProbe()
    trainer = quiet_trainer(accelerator="gpu", devices=1, strategy="hift", max_steps=8, callbacks=[probe])
    trainer.fit(TinyModule(optimizer=optimizer))
    assert trainer.strategy.root_device.type == "cuda"
    assert probe.checked > 0


def test_pinned_buffers_are_allocated_once_and_reused() -> None:
    counts: list[int] = []

    class CountPinnedBuffers(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
            placement = trainer.strategy.placement  # type: ignore[attr-defined]
            counts.append(len(placement.transfer))

    trainer = quiet_trainer(
        accelerator="gpu", devices=1, strategy="hift", max_steps=18, callbacks=[CountPinnedBuffers()]
    )
    trainer.fit(TinyModule())
    assert counts[6] == counts[-1] > 0  # after the first cycle (six blocks) no new buffer is pinned


def _train_on_gpu(mode: str, precision: str, callbacks: list[Callback] | None = None) -> list[torch.Tensor]:
    seed_everything(0)
    module = TinyModule()
    trainer = quiet_trainer(
        accelerator="gpu",
        devices=1,
        strategy=HiFTStrategy(optimizer_state=mode),
        precision=precision,
        max_steps=20,
        callbacks=callbacks or [],
    )
    trainer.fit(module)
    return [p.detach().cpu().clone() for p in module.parameters()]


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_offloading_through_side_stream_copies_changes_no_bit(precision: str) -> None:
    kept = _train_on_gpu("keep", precision)
    offloaded = _train_on_gpu("offload", precision)
    for a, b in zip(kept, offloaded, strict=True):
        assert torch.equal(a, b)


def test_next_blocks_state_is_prefetched_while_the_current_step_runs() -> None:
    pending: list[set[object]] = []

    class Incoming(Callback):
        def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
            pending.append(set(trainer.strategy.placement.transfer._incoming))  # type: ignore[attr-defined]

    _train_on_gpu("offload", "32-true", [Incoming()])
    # From the second cycle on every block has state on the host, so the next one is always on its way in.
    assert all(("state", (step + 1) % 6) in tags for step, tags in enumerate(pending) if step >= 6)


# --- set-ups where a missing stream wait or a wrongly placed tensor would show ------------------------------------


class WideModule(LightningModule):
    """Four 2048-wide layers: each block's state is 32 MiB, so a copy takes long enough to be caught mid-flight."""

    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.optimizer_name = optimizer

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.float().pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, WIDTH, generator=generator))
        # A resumed epoch starts at the first batch the interrupted run had not trained on.
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return DataLoader(data, batch_size=8, sampler=SkipOnce(range(len(data)), done * 8))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        options = {"fused": {"fused": True}, "foreach": {"foreach": True}}.get(self.optimizer_name, {})
        return torch.optim.AdamW(self.parameters(), lr=1e-3, **options)


WIDTH = 2048
CUT = 6  # the step resumed from: mid-epoch (8 batches) and mid-cycle (4 blocks)


def _checkpoint_at_cut(folder: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=CUT)


class BusyBeforeTheStep(Callback):
    """Queues a long kernel before every optimizer step, so that the step (and what it writes) runs late: a copy of
    the block's state that did not wait for the compute stream would read the values from before the step."""

    def on_before_optimizer_step(self, trainer: Trainer, *args: object) -> None:
        torch.cuda._sleep(20_000_000)


def _train_wide(mode: str, precision: str, optimizer: str = "adamw", steps: int = 12, **trainer: Any) -> list[Tensor]:
    seed_everything(0)
    module = WideModule(optimizer)
    callbacks = [BusyBeforeTheStep(), *trainer.pop("callbacks", [])]
    ckpt_path = trainer.pop("ckpt_path", None)
    fit_trainer = quiet_trainer(
        accelerator="gpu",
        devices=1,
        strategy=HiFTStrategy(optimizer_state=mode),
        precision=precision,
        max_steps=steps,
        callbacks=callbacks,
        **trainer,
    )
    fit_trainer.fit(module, ckpt_path=ckpt_path)
    return [p.detach().cpu().clone() for p in module.parameters()]


@pytest.mark.parametrize("optimizer", ["adamw", "fused", "foreach"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_large_blocks_behind_a_busy_stream_offload_without_changing_a_bit(optimizer: str, precision: str) -> None:
    kept = _train_wide("keep", precision, optimizer)
    offloaded = _train_wide("offload", precision, optimizer)
    for a, b in zip(kept, offloaded, strict=True):
        assert torch.equal(a, b)


class PinnedProbe(Callback):
    """Every tensor at rest in host memory is pinned, and the pinned bytes are what the block buffers hold."""

    def __init__(self) -> None:
        self.checked = 0

    def _check(self, trainer: Trainer) -> None:
        strategy: Any = trainer.strategy
        rest = [block for block in strategy.blocks if block.index != strategy.active_block]
        host: list[Tensor] = []
        for block in rest:
            keys = strategy.masters.masters(block) if strategy.masters is not None else block.params
            host += [v for p in keys for k, v in trainer.optimizers[0].state.get(p, {}).items() if k != "step"]
            if strategy.masters is not None:
                host += [m.data for m in strategy.masters.masters(block)]
        assert host and all(t.device.type == "cpu" and t.is_pinned() for t in host)
        pinned = snapshot(strategy).pinned
        stored = sum(t.nbytes for t in host)
        assert stored <= pinned <= stored + ALIGN * len(host) + _active_bytes(strategy)
        self.checked += 1

    def on_train_start(self, trainer: Trainer, *args: object) -> None:
        if trainer.strategy.masters is not None:  # type: ignore[attr-defined]
            masters: Any = trainer.strategy.masters  # type: ignore[attr-defined]
            waiting = [block for block in masters.blocks if masters.where(block) == "host"]
            assert waiting and all(m.is_pinned() for block in waiting for m in masters.masters(block))

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step > len(trainer.strategy.blocks):  # type: ignore[attr-defined]
            self._check(trainer)


def _active_bytes(strategy: Any) -> int:
    """The active block's buffers stay allocated (and pinned) while its tensors are on the device."""
    block = strategy.blocks[strategy.active_block]
    keys = strategy.masters.masters(block) if strategy.masters is not None else block.params
    state = sum(v.nbytes for p in keys for k, v in strategy.optimizers[0].state.get(p, {}).items() if k != "step")
    masters = sum(m.nbytes for m in keys) if strategy.masters is not None else 0
    return state + masters + ALIGN * 64


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_host_state_and_masters_are_pinned_and_counted_as_pinned_also_after_a_resume(
    precision: str, tmp_path: Path
) -> None:
    first = PinnedProbe()
    callbacks = [first, _checkpoint_at_cut(tmp_path)]
    _train_wide("offload", precision, steps=CUT, callbacks=callbacks, enable_checkpointing=True)
    resumed = PinnedProbe()
    _train_wide("offload", precision, steps=2 * CUT, callbacks=[resumed], ckpt_path=tmp_path / f"step={CUT}.ckpt")
    assert first.checked > 0 and resumed.checked > 0


@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_a_bf16_run_resumes_on_the_device_under_keep_and_reset_bit_for_bit(mode: str, tmp_path: Path) -> None:
    whole = _train_wide(mode, "bf16-true", steps=2 * CUT)
    _train_wide(mode, "bf16-true", steps=CUT, callbacks=[_checkpoint_at_cut(tmp_path)], enable_checkpointing=True)
    resumed = _train_wide(mode, "bf16-true", steps=2 * CUT, ckpt_path=tmp_path / f"step={CUT}.ckpt")
    for a, b in zip(whole, resumed, strict=True):
        assert torch.equal(a, b)


def test_no_device_memory_of_the_fit_is_left_after_it() -> None:
    gc.collect()
    before = torch.cuda.memory_allocated()
    _train_wide("offload", "bf16-true", steps=6)
    gc.collect()
    # Lightning moves the model and the optimizer state back to the host; HiFT must leave nothing behind either.
    assert torch.cuda.memory_allocated() == before


def test_the_cuda_sanitizer_finds_no_race_in_a_run() -> None:
    script = (
        "from tests.test_strategy_cuda import _train_wide\n"
        "_train_wide('offload', 'bf16-true', steps=6)\n"
        "_train_wide('offload', '32-true', 'fused', steps=6)\n"
    )
    env = {**os.environ, "TORCH_CUDA_SANITIZER": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "CSAN" not in result.stderr, result.stderr[-4000:]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_auto_on_cuda_takes_the_device_budget_and_predicts_what_the_steps_save(precision: str) -> None:
    """The trace on fake CUDA tensors, under CUDA autocast, against what autograd saves in the real CUDA steps."""
    from tests.test_budget import UNITS, SavedBytes

    saved = SavedBytes()
    strategy = HiFTStrategy(layers_per_block="auto")  # the default budget: the device's memory less 10%
    trainer = quiet_trainer(
        accelerator="gpu", devices=1, strategy=strategy, max_steps=UNITS, precision=precision, callbacks=[saved]
    )
    trainer.fit(TinyModule(num_layers=4))
    assert strategy.layers_per_block == UNITS and strategy.memory_estimate is not None
    assert strategy.memory_estimate.get("activations", "device") == max(saved.by_block.values())

"""Where tensors really live on a CUDA device. Skipped on machines without one."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.lightning import Callback, HiFTStrategy, Trainer, seed_everything
from tests.helpers.modules import TinyModule

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
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        strategy="hift",
        max_steps=8,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(TinyModule(optimizer=optimizer))
    assert trainer.strategy.root_device.type == "cuda"
    assert probe.checked > 0


def test_pinned_buffers_are_allocated_once_and_reused() -> None:
    counts: list[int] = []

    class CountPinnedBuffers(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
            placement = trainer.strategy.placement  # type: ignore[attr-defined]
            counts.append(len(placement.transfer))

    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        strategy="hift",
        max_steps=18,
        callbacks=[CountPinnedBuffers()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(TinyModule())
    assert counts[6] == counts[-1] > 0  # after the first cycle (six blocks) no new buffer is pinned


def _train_on_gpu(mode: str, precision: str, callbacks: list[Callback] | None = None) -> list[torch.Tensor]:
    seed_everything(0)
    module = TinyModule()
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        strategy=HiFTStrategy(optimizer_state=mode),
        precision=precision,  # type: ignore[arg-type]
        max_steps=20,
        callbacks=callbacks or [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
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

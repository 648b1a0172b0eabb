"""Where tensors really live on a CUDA device. Skipped on machines without one."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_hift import HiFTStrategy
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
            counts.append(len(placement._pinned))

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

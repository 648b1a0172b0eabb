"""Resuming from a checkpoint taken mid-cycle and mid-epoch ends bit for bit where the uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_hift import HiFTStrategy
from tests.helpers.modules import ResumableTinyModule

TOTAL, CUT = 22, 10  # 16 batches an epoch, 6 blocks a cycle: step 10 is mid-epoch and mid-cycle


def train(tmp_path: Path, strategy: dict[str, Any], ckpt_path: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    seed_everything(11)
    module = ResumableTinyModule(schedule=(4, TOTAL), optimizer=strategy.pop("optimizer", "adamw"))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=CUT, save_top_k=-1, filename="{step}")
    trainer = Trainer(
        accelerator="cpu",
        strategy=HiFTStrategy(**strategy),
        max_steps=TOTAL,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_resume_is_exact(tmp_path: Path, accumulate: int = 1, **strategy: Any) -> None:
    full = train(tmp_path / "full", dict(strategy), accumulate_grad_batches=accumulate)
    (ckpt,) = (tmp_path / "full").glob(f"step={CUT}.ckpt")
    torch.load(ckpt, weights_only=True)  # tensors and plain values only
    resumed = train(tmp_path / "resumed", dict(strategy), ckpt_path=ckpt, accumulate_grad_batches=accumulate)
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name


@pytest.mark.parametrize("order", ["bottom2up", "top2down", "random"])
@pytest.mark.parametrize("optimizer_state", ["offload", "reset", "keep"])
@pytest.mark.parametrize("lr_update", ["cycle", "stretched", "step"])
def test_resume_matrix(tmp_path: Path, order: str, optimizer_state: str, lr_update: str) -> None:
    assert_resume_is_exact(tmp_path, order=order, optimizer_state=optimizer_state, lr_update=lr_update)


@pytest.mark.parametrize("order", ["bottom2up", "random"])
@pytest.mark.parametrize("optimizer_state", ["offload", "reset"])
def test_resume_with_accumulation_and_switch_every(tmp_path: Path, order: str, optimizer_state: str) -> None:
    assert_resume_is_exact(tmp_path, accumulate=2, order=order, optimizer_state=optimizer_state, switch_every=3)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adafactor"])
def test_resume_with_other_optimizers(tmp_path: Path, optimizer: str) -> None:
    assert_resume_is_exact(tmp_path, optimizer=optimizer, optimizer_state="offload")

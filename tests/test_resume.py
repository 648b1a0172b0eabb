"""Resuming from a checkpoint taken mid-cycle and mid-epoch ends bit for bit where the uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.lightning import HiFTStrategy, ModelCheckpoint, Trainer, seed_everything
from tests.helpers.modules import ResumableTinyModule

TOTAL, CUT = 22, 10  # 16 batches an epoch, 6 blocks a cycle: step 10 is mid-epoch and mid-cycle


def train(tmp_path: Path, strategy: dict[str, Any], ckpt_path: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    seed_everything(11)
    module = ResumableTinyModule(schedule=(4, TOTAL), optimizer=strategy.pop("optimizer", "adamw"))
    precision = strategy.pop("precision", "32-true")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=CUT, save_top_k=-1, filename="{step}")
    trainer = Trainer(
        accelerator="cpu",
        strategy=HiFTStrategy(**strategy),
        precision=precision,
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
@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_matrix(tmp_path: Path, order: str, optimizer_state: str, lr_update: str, accumulate: int) -> None:
    assert_resume_is_exact(
        tmp_path, accumulate=accumulate, order=order, optimizer_state=optimizer_state, lr_update=lr_update
    )


@pytest.mark.parametrize("order", ["bottom2up", "random"])
@pytest.mark.parametrize("optimizer_state", ["offload", "reset"])
def test_resume_with_switch_every(tmp_path: Path, order: str, optimizer_state: str) -> None:
    assert_resume_is_exact(tmp_path, accumulate=2, order=order, optimizer_state=optimizer_state, switch_every=3)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adafactor"])
def test_resume_with_other_optimizers(tmp_path: Path, optimizer: str) -> None:
    assert_resume_is_exact(tmp_path, optimizer=optimizer, optimizer_state="offload")


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_resume_under_half_precision_restores_the_fp32_masters(tmp_path: Path, precision: str) -> None:
    assert_resume_is_exact(tmp_path, precision=precision)


def _fit_from(strategy: Any, ckpt_path: Path | None, max_steps: int, save_to: Path | None = None) -> Trainer:
    callbacks = [ModelCheckpoint(dirpath=save_to, every_n_train_steps=4, filename="{step}")] if save_to else []
    trainer = Trainer(
        accelerator="cpu",
        strategy=strategy,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=save_to is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ResumableTinyModule(), ckpt_path=ckpt_path)
    return trainer


def test_a_plain_checkpoint_continues_under_hift_and_a_hift_one_under_plain_training(tmp_path: Path) -> None:
    _fit_from("auto", None, 4, save_to=tmp_path / "plain")
    hift = _fit_from(HiFTStrategy(), tmp_path / "plain" / "step=4.ckpt", 10, save_to=tmp_path / "hift")
    assert hift.global_step == 10
    callback = next(c for c in hift.callbacks if type(c).__name__ == "HiFTCallback")  # type: ignore[attr-defined]
    assert callback.steps == 6  # the schedule starts at its first block when the checkpoint has none
    plain = _fit_from("auto", tmp_path / "hift" / "step=8.ckpt", 12)
    assert plain.global_step == 12
    assert all(p.requires_grad for p in plain.lightning_module.parameters())

"""Faults: non-finite gradients never reach the weights; SIGTERM and Ctrl-C leave a checkpoint that resumes exactly."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from tests.helpers.lightning import (
    Callback,
    HiFTStrategy,
    LightningModule,
    OnExceptionCheckpoint,
    SIGTERMException,
    Trainer,
    seed_everything,
)
from tests.helpers.modules import ResumableTinyModule, StepRecorder, TinyModule, fit, quiet_trainer

UNITS = 6


class NaNAt(TinyModule):
    """The loss of the micro-batches at the given global steps is NaN."""

    def __init__(self, steps: set[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_steps = steps

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step in self.nan_steps else loss


def all_state_finite(trainer: Trainer) -> bool:
    state = trainer.optimizers[0].state
    return all(bool(v.isfinite().all()) for s in state.values() for v in s.values() if isinstance(v, Tensor))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_nonfinite_step_is_skipped_and_changes_nothing(precision: str) -> None:
    recorder = StepRecorder()
    module = NaNAt({3})
    with pytest.warns(UserWarning, match="non-finite gradients in block 3"):
        trainer = fit(module, HiFTStrategy(), 2 * UNITS, [recorder], precision=precision)
    assert recorder.changed[3] == set()
    assert all(recorder.changed[step] for step in range(2 * UNITS) if step != 3)
    assert trainer.strategy.skipped_nonfinite == 1  # type: ignore[attr-defined]
    assert all(bool(p.isfinite().all()) for p in module.parameters())
    assert all_state_finite(trainer)


def test_nonfinite_micro_batch_skips_its_whole_accumulation_window() -> None:
    recorder = StepRecorder()
    fit(NaNAt({2}), HiFTStrategy(), 4, [recorder], accumulate_grad_batches=2)
    # Micro-batches 4 and 5 form step 2; the NaN in micro-batch 4 poisons the window's gradient.
    assert recorder.changed[5] == set()
    assert recorder.changed[3] and recorder.changed[7]


def test_nonfinite_step_can_stop_training_with_weights_intact() -> None:
    module = NaNAt({4})
    snapshots: list[dict[str, Tensor]] = []

    class Keep(Callback):
        def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
            snapshots.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    with pytest.raises(FloatingPointError, match="on_nonfinite='skip'"):
        fit(module, HiFTStrategy(on_nonfinite="stop"), 10, [Keep()])
    for name, p in module.named_parameters():
        assert torch.equal(p, snapshots[-1][name])  # as after step 3: step 4 changed nothing


def _interrupted_then_resumed(tmp_path: Path, interrupt: Callback, expected: type[BaseException]) -> None:
    def run(callbacks: list[Callback], ckpt: Path | None = None) -> dict[str, Tensor]:
        seed_everything(5)
        module = ResumableTinyModule(schedule=(4, 20))
        trainer = quiet_trainer(
            strategy=HiFTStrategy(order="random"),
            max_steps=20,
            callbacks=callbacks,
            default_root_dir=tmp_path / "root",  # Lightning's own epoch-end checkpoints go there
            enable_checkpointing=True,
        )
        trainer.fit(module, ckpt_path=ckpt)
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    uninterrupted = run([])
    with pytest.raises(expected):
        run([interrupt, OnExceptionCheckpoint(tmp_path)])
    checkpoint = tmp_path / "on_exception.ckpt"
    torch.load(checkpoint, weights_only=True)
    resumed = run([], ckpt=checkpoint)
    for name, value in uninterrupted.items():
        assert torch.equal(value, resumed[name]), name


class SignalAtStep(Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class CtrlCAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_sigterm_leaves_a_checkpoint_that_resumes_exactly(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        _interrupted_then_resumed(tmp_path, SignalAtStep(9, signal.SIGTERM), SIGTERMException)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_leaves_a_checkpoint_that_resumes_exactly(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGINT)
    try:
        _interrupted_then_resumed(tmp_path, CtrlCAtStep(9), SystemExit)
    finally:
        signal.signal(signal.SIGINT, previous)

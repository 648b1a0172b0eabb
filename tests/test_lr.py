"""The delayed learning rate: a cycle trains at the mean of what the schedule gives its steps."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, OneCycleLR

from tests.helpers.lightning import Callback, HiFTStrategy, ModelCheckpoint, Trainer, seed_everything
from tests.helpers.modules import ResumableTinyModule, quiet_trainer

UNITS, TOTAL, LR, WARMUP = 6, 30, 0.01, 3  # the warm-up from 0 is shorter than a cycle

SCHEDULES: dict[str, Callable[[torch.optim.Optimizer], LRScheduler]] = {
    "warmup-linear": lambda opt: LambdaLR(opt, lambda s: s / WARMUP if s < WARMUP else (TOTAL - s) / (TOTAL - WARMUP)),
    "cosine": lambda opt: CosineAnnealingLR(opt, T_max=TOTAL),
    "onecycle": lambda opt: OneCycleLR(opt, max_lr=LR, total_steps=TOTAL),
}


class Scheduled(ResumableTinyModule):
    def __init__(self, schedule: str) -> None:
        super().__init__(lr=LR)
        self.schedule_name = schedule

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=LR)
        scheduler = SCHEDULES[self.schedule_name](optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Rates(Callback):
    """The learning rate of every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def run(schedule: str, strategy: Any, tmp_path: Path | None = None, ckpt: Path | None = None, **kwargs: Any) -> Any:
    seed_everything(0)
    module = Scheduled(schedule)
    rates = Rates()
    callbacks: list[Any] = [rates]
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=13, save_top_k=-1, filename="{step}"))
    trainer = quiet_trainer(
        strategy=strategy,
        max_steps=TOTAL,
        callbacks=callbacks,
        enable_checkpointing=tmp_path is not None,
        **kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt)
    return rates.lrs, {n: p.detach().clone() for n, p in module.named_parameters()}, trainer


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize(("accumulate", "switch_every"), [(1, 1), (2, 1), (1, 2)])
def test_a_cycle_trains_at_the_mean_of_its_schedule(schedule: str, accumulate: int, switch_every: int) -> None:
    plain, _, _ = run(schedule, "auto", accumulate_grad_batches=accumulate)
    held, _, trainer = run(schedule, HiFTStrategy(switch_every=switch_every), accumulate_grad_batches=accumulate)
    assert len(held) == len(plain) == TOTAL
    assert min(held) > 0  # no cycle trains at the warm-up's start value
    assert sum(held) == pytest.approx(sum(plain), rel=0.02)
    cycle = UNITS * switch_every
    for start in range(0, TOTAL, cycle):
        steps = range(start, min(start + cycle, TOTAL))
        mean = sum(plain[t] for t in steps) / len(steps)
        assert [held[t] for t in steps] == pytest.approx([mean] * len(steps), rel=1e-9)
    (config,) = trainer.lr_scheduler_configs
    assert config.scheduler.last_epoch == TOTAL  # the schedule ends with the run, not past it
    assert config.frequency == 1


@pytest.mark.parametrize("schedule", ["warmup-linear", "onecycle"])
def test_resuming_in_the_middle_of_a_cycle_is_exact(schedule: str, tmp_path: Path) -> None:
    strategy = {"switch_every": 2}
    lrs, full, _ = run(schedule, HiFTStrategy(**strategy), tmp_path / "full", accumulate_grad_batches=2)
    ckpt = tmp_path / "full" / "step=13.ckpt"  # step 13 is inside the second cycle of twelve steps
    resumed_lrs, resumed, _ = run(schedule, HiFTStrategy(**strategy), ckpt=ckpt, accumulate_grad_batches=2)
    assert resumed_lrs == lrs[13:]
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name


def test_stepping_the_schedule_ahead_raises_no_warning_about_the_order() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run("cosine", HiFTStrategy())
    assert not any("lr_scheduler.step()" in str(w.message) for w in caught)

"""The learning rate under HiFT: a cycle trains at the mean of what the schedule gives its steps, and each update
multiplies the configured rates by ``lr_scale``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, OneCycleLR
from torch.utils.data import DataLoader, IterableDataset
from transformers.optimization import Adafactor

from lightning_hift.errors import HiFTConfigError
from lightning_hift.lr import scaled as lr_scaled
from tests.helpers.lightning import Callback, HiFTStrategy, ModelCheckpoint, Trainer, seed_everything
from tests.helpers.modules import ResumableTinyModule, StepRecorder, quiet_trainer

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


def run(
    schedule: str,
    strategy: Any,
    tmp_path: Path | None = None,
    ckpt: Path | None = None,
    callbacks: Sequence[Callback] = (),
    **kwargs: Any,
) -> Any:
    seed_everything(0)
    module = Scheduled(schedule)
    rates = StepRecorder()
    every: list[Callback] = [rates, *callbacks]
    if tmp_path is not None:
        every.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=13, save_top_k=-1, filename="{step}"))
    options = {"max_steps": TOTAL, "enable_checkpointing": tmp_path is not None} | kwargs
    trainer = quiet_trainer(strategy=strategy, callbacks=every, **options)
    trainer.fit(module, ckpt_path=ckpt)
    return rates.update_lrs, {n: p.detach().clone() for n, p in module.named_parameters()}, trainer


@pytest.mark.integration
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize(("accumulate", "switch_every"), [(1, 1), (2, 1), (1, 2)])
def test_a_cycle_trains_at_the_mean_of_its_schedule(schedule: str, accumulate: int, switch_every: int) -> None:
    plain, _, _ = run(schedule, "auto", accumulate_grad_batches=accumulate)
    # lr_scale=1.0: the rates as the delayed schedule sets them, not multiplied by the number of blocks.
    strategy = HiFTStrategy(switch_every=switch_every, lr_scale=1.0)
    held, _, trainer = run(schedule, strategy, accumulate_grad_batches=accumulate)
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


# --- lr_scale: what an update multiplies the configured rates by ---------------------------------------------------


class UpdateSizes(StepRecorder):
    """StepRecorder's rates before each step (``lrs``) and inside it, where the update's hooks run (``update_lrs``);
    the rate after it, and the step length of the update, |delta| / |grad| over the parameters that had gradients."""

    def __init__(self) -> None:
        super().__init__(grads=True)
        self.after: list[float] = []
        self.lengths: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self.after.append(trainer.optimizers[0].param_groups[0]["lr"])
        grads, params = self.grads[-1], dict(pl_module.named_parameters())
        moved = torch.cat([(self._before[n] - params[n].detach()).flatten() for n in grads])
        self.lengths.append(float(moved.norm() / torch.cat([g.flatten() for g in grads.values()]).norm()))


def sgd_run(strategy: Any, steps: int = 12) -> UpdateSizes:
    seed_everything(0)
    module = ResumableTinyModule(optimizer="sgd", lr=0.01)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.01)  # type: ignore[method-assign]
    sizes = UpdateSizes()
    quiet_trainer(strategy=strategy, max_steps=steps, callbacks=[sizes]).fit(module)
    return sizes


@pytest.mark.parametrize(("lr_scale", "factor"), [("blocks", UNITS), (1.0, 1.0), (2.5, 2.5)])
def test_each_update_runs_at_the_configured_rate_times_lr_scale(lr_scale: Any, factor: float) -> None:
    sizes = sgd_run(HiFTStrategy(lr_scale=lr_scale))
    # Plain SGD moves the parameters by lr * grad: the step's rate is read off the update itself.
    assert sizes.lengths == pytest.approx([0.01 * factor] * 12, rel=1e-3)
    # The optimizer holds the configured rate before and after each update, so schedulers, LearningRateMonitor and
    # checkpoints only ever see it; the hooks inside the update see the rate it uses.
    assert sizes.lrs == sizes.after == [0.01] * 12
    assert sizes.update_lrs == pytest.approx([0.01 * factor] * 12)


def test_lr_scale_leaves_the_schedule_as_configured() -> None:
    one, _, trainer_one = run("warmup-linear", HiFTStrategy(lr_scale=1.0))
    scaled, _, trainer_scaled = run("warmup-linear", HiFTStrategy(lr_scale="blocks"))
    assert scaled == pytest.approx([rate * UNITS for rate in one])  # the rate of each update
    (config_one,), (config_scaled,) = trainer_one.lr_scheduler_configs, trainer_scaled.lr_scheduler_configs
    assert config_scaled.scheduler.state_dict() == config_one.scheduler.state_dict()


def test_a_run_with_lr_scale_resumes_exactly(tmp_path: Path) -> None:
    _, whole, _ = run("warmup-linear", HiFTStrategy(lr_scale="blocks"), tmp_path)
    _, resumed, _ = run("warmup-linear", HiFTStrategy(lr_scale="blocks"), ckpt=tmp_path / "step=13.ckpt")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_the_configured_rates_come_back_when_the_update_raises() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.3})
    with pytest.raises(RuntimeError, match="boom"), lr_scaled(optimizer, 4.0):
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.4, 1.2])
        raise RuntimeError("boom")
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.3]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "auto", True, None])
def test_a_bad_lr_scale_is_refused_with_the_choices(bad: Any) -> None:
    with pytest.raises(HiFTConfigError, match=r"lr_scale must be 'blocks' .* or a positive number"):
        HiFTStrategy(lr_scale=bad)


# --- runs extended past their end, schedulers with a frequency, rates that are not floats --------------------------


class Frequency(ResumableTinyModule):
    """A scheduler that moves the rate at each of its steps, stepped every ``frequency`` batches (Lightning counts
    batches of the epoch, at the optimizer steps); ``samples`` sets the epoch's length."""

    def __init__(self, frequency: int, samples: int = 64) -> None:
        super().__init__(lr=LR, samples=samples)
        self.frequency = frequency

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=LR)
        scheduler = LambdaLR(optimizer, lambda s: 1 / (1 + s))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": self.frequency},
        }


def run_module(module: Any, strategy: Any, **kwargs: Any) -> tuple[list[float], Trainer]:
    seed_everything(0)
    rates = StepRecorder()
    trainer = quiet_trainer(strategy=strategy, callbacks=[rates, *kwargs.pop("callbacks", [])], **kwargs)
    trainer.fit(module, ckpt_path=kwargs.pop("ckpt_path", None))
    return rates.update_lrs, trainer


@pytest.mark.parametrize("frequency", [2, 3])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_scheduler_with_a_frequency_moves_as_lightning_moves_it(frequency: int, accumulate: int) -> None:
    # 11 batches an epoch: neither the accumulation nor the frequency divides it, so Lightning's count restarts with
    # every epoch at a different phase; 30 optimizer steps span several epochs.
    trainer_kwargs = {"max_steps": TOTAL, "accumulate_grad_batches": accumulate}
    plain, plain_trainer = run_module(Frequency(frequency, samples=44), "auto", **trainer_kwargs)
    stepped, _ = run_module(Frequency(frequency, samples=44), HiFTStrategy(lr_update="step", lr_scale=1.0),
                            **trainer_kwargs)  # fmt: skip
    held, trainer = run_module(Frequency(frequency, samples=44), HiFTStrategy(lr_scale=1.0), **trainer_kwargs)
    assert stepped == plain
    for start in range(0, TOTAL, UNITS):  # each cycle at the mean of what Lightning's schedule gives its steps
        steps = range(start, min(start + UNITS, TOTAL))
        mean = sum(plain[t] for t in steps) / len(steps)
        assert [held[t] for t in steps] == pytest.approx([mean] * len(steps), rel=1e-12)
    (config,), (plain_config,) = trainer.lr_scheduler_configs, plain_trainer.lr_scheduler_configs
    assert config.scheduler.state_dict() == plain_config.scheduler.state_dict()
    assert config.frequency == frequency


class Unsized(Frequency):
    """The same data as an iterable of unknown length: the look-ahead cannot see where an epoch ends."""

    def train_dataloader(self) -> Any:
        batches = list(super().train_dataloader())
        return DataLoader(_Batches(batches), batch_size=None)


class _Batches(IterableDataset):
    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)


def test_a_frequency_over_epochs_of_unknown_length_keeps_lightnings_schedule() -> None:
    plain, plain_trainer = run_module(Unsized(3, samples=44), "auto", max_steps=TOTAL)
    held, trainer = run_module(Unsized(3, samples=44), HiFTStrategy(lr_scale=1.0), max_steps=TOTAL)
    (config,), (plain_config,) = trainer.lr_scheduler_configs, plain_trainer.lr_scheduler_configs
    assert config.scheduler.state_dict() == plain_config.scheduler.state_dict()
    # Where an epoch ended unforeseen mid-cycle, the look-ahead was off for that cycle (its rest trains at the mean
    # of the rest, seen afresh): the rates summed stay near the schedule's.
    assert sum(held) == pytest.approx(sum(plain), rel=0.05)


@pytest.mark.parametrize("lr_update", ["cycle", "stretched", "step"])
@pytest.mark.parametrize("schedule", ["warmup-linear", "onecycle"])
@pytest.mark.parametrize(("first", "cut"), [(16, 18), (3, 6)])
def test_a_finished_run_extended_to_more_steps_follows_the_uninterrupted_schedule(
    tmp_path: Path, lr_update: str, schedule: str, first: int, cut: int
) -> None:
    # Cut cycles: 16 steps end in the cycle of steps 12-17 (six blocks), 3 in the cycle of steps 0-5. The schedule is
    # built for TOTAL steps in every run; only max_steps changes, as a user who trains longer would.
    strategy = {"lr_update": lr_update, "lr_scale": 1.0}
    full, _, full_trainer = run(schedule, HiFTStrategy(**strategy))
    save = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    short, _, _ = run(schedule, HiFTStrategy(**strategy), max_steps=first, callbacks=[save], enable_checkpointing=True)
    rest, _, trainer = run(schedule, HiFTStrategy(**strategy), ckpt=tmp_path / "last.ckpt")
    assert len(short) + len(rest) == TOTAL
    if lr_update == "cycle":
        # The cut cycle trained its first steps at their own mean and trains the rest at theirs; from the next cycle
        # on, the run is the uninterrupted one.
        assert sum(short[:first]) + sum(rest[: cut - first]) == pytest.approx(sum(full[:cut]), rel=1e-12)
        assert rest[cut - first :] == full[cut:]
    else:
        assert short + rest == full
    (config,), (full_config,) = trainer.lr_scheduler_configs, full_trainer.lr_scheduler_configs
    assert config.scheduler.state_dict() == full_config.scheduler.state_dict()


def test_the_rate_summed_over_an_extended_run_is_the_schedules(tmp_path: Path) -> None:
    plain, _, _ = run("warmup-linear", "auto")
    save = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    strategy = {"lr_scale": 1.0}
    short, _, _ = run(
        "warmup-linear", HiFTStrategy(**strategy), max_steps=10, callbacks=[save], enable_checkpointing=True
    )
    rest, _, _ = run("warmup-linear", HiFTStrategy(**strategy), ckpt=tmp_path / "last.ckpt")
    assert min(short + rest) > 0
    assert sum(short + rest) == pytest.approx(sum(plain), rel=1e-12)


class Adafactored(ResumableTinyModule):
    """``transformers.optimization.Adafactor`` as its documentation shows it: it sizes its own steps."""

    def configure_optimizers(self) -> Any:
        return Adafactor(self.parameters())


def test_adafactor_with_its_own_step_size_trains_and_lr_scale_is_said_not_to_apply() -> None:
    recorder = StepRecorder()
    with pytest.warns(UserWarning, match=r"sizes its own steps in param groups \[0\].*lr_scale does not apply"):
        trainer = quiet_trainer(strategy=HiFTStrategy(), max_steps=UNITS, callbacks=[recorder])
        trainer.fit(Adafactored())
    blocks = [set(block.names) for block in trainer.strategy.blocks]  # type: ignore[attr-defined]
    assert recorder.changed == blocks
    assert trainer.optimizers[0].param_groups[0]["lr"] is None


class TensorRate(Scheduled):
    """A rate given as a tensor (torch's capturable and fused optimizers take one); the scheduler fills it in place."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=torch.tensor(LR))
        scheduler = SCHEDULES[self.schedule_name](optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_a_rate_held_in_a_tensor_is_averaged_and_scaled_like_a_number() -> None:
    numbers, _, _ = run("warmup-linear", HiFTStrategy())
    seed_everything(0)
    rates = StepRecorder()
    trainer = quiet_trainer(strategy=HiFTStrategy(), max_steps=TOTAL, callbacks=[rates])
    trainer.fit(TensorRate("warmup-linear"))
    assert rates.update_lrs == pytest.approx(numbers, rel=1e-6)  # float32 tensor against floats
    assert isinstance(trainer.optimizers[0].param_groups[0]["lr"], torch.Tensor)


class NoRate(torch.optim.SGD):
    """An optimizer whose param groups carry no learning rate."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=0.1)
        for group in self.param_groups:
            del group["lr"]


@pytest.mark.parametrize("lr", ["missing", "text"])
def test_a_param_group_without_a_numeric_rate_is_refused_before_the_first_step(lr: str) -> None:
    module = ResumableTinyModule()

    def configure_optimizers() -> Any:
        if lr == "missing":
            return NoRate(module.parameters())
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        optimizer.param_groups[0]["lr"] = "0.1"
        return optimizer

    module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(HiFTConfigError, match=r"Param group 0 of \w+ has (no 'lr' entry|lr='0.1').*Give the group"):
        quiet_trainer(strategy=HiFTStrategy(), max_steps=2).fit(module)
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())

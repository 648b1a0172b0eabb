"""The delayed learning-rate update: every block of a cycle sees the same learning rate.

HiFT moves the learning rate only between cycles, so that every block of a cycle trains at the same rate. The
user's schedulers stay stock torch schedulers, stepped exactly when Lightning would step them; only the rate the
optimizer holds between their steps changes. Modes:

``"cycle"``
    A cycle trains at the mean of the rates the schedule gives its steps. When a cycle starts, HiFT looks ahead:
    it steps the schedulers through the cycle's steps (at the batches where Lightning will step them, ``frequency``
    and gradient accumulation included), notes the rates they pass and puts their state back. The schedulers
    themselves then move step by step as under plain Lightning, so a schedule built for ``max_steps`` ends at
    ``max_steps``, a run resumed or extended to more steps follows the schedule of the run never interrupted, and
    the rate summed over a run equals the schedule's; a warm-up from 0 does not cost a first cycle trained at 0.
    The last cycle of a run is cut at its end; a run extended past it trains the rest of that cycle at the mean
    of the rest.
``"stretched"``
    One scheduler step per cycle (per ``frequency`` cycles), as the paper's reference code did. A schedule built
    for ``max_steps`` then runs ``k`` times slower (warm-up included) and never finishes; kept to reproduce
    published runs.
``"step"``
    No delay: Lightning steps the schedulers as usual.

Epoch-interval schedulers and ReduceLROnPlateau are left to Lightning in every mode.

Separately, ``lr_scale`` multiplies the rates for the length of each update (:func:`scaled`): a block trains in
1/k of the steps, so at a full fine-tuning recipe's rate it would move about k times less over a run than under full
fine-tuning. The schedulers and checkpoints only ever see the configured rates. An optimizer that sets its own step
size (``lr=None``, or Adafactor's ``relative_step=True``) is left to it: its step size follows each block's own
update count, and ``lr_scale`` does not apply to it.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_hift.errors import HiFTConfigError

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.types import LRSchedulerConfig
    from torch.optim import Optimizer

LRUpdate = Literal["cycle", "stretched", "step"]
MODES: tuple[str, ...] = ("cycle", "stretched", "step")
LRScale = Literal["blocks"] | float

# Lightning steps a step-interval scheduler when `(batch_idx + 1) % frequency == 0`; with this frequency it never
# does, and the scheduler keeps interval="step" so LearningRateMonitor still logs it every step.
_NEVER = sys.maxsize


def check_mode(mode: str) -> None:
    if not isinstance(mode, str) or mode not in MODES:
        raise HiFTConfigError(f"Unknown lr_update={mode!r}. Choose one of {list(MODES)}.")


def check_scale(scale: object) -> None:
    if scale == "blocks":
        return
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0:
        return
    raise HiFTConfigError(
        f"lr_scale must be 'blocks' (multiply the learning rate by the number of blocks) or a positive number"
        f" (1.0 keeps the configured rate), got lr_scale={scale!r}."
    )


def sets_own_step_size(group: dict[str, Any]) -> bool:
    """Whether the optimizer ignores ``group["lr"]`` and sizes its steps itself: ``lr=None``, or Adafactor's
    ``relative_step=True``."""
    return group.get("lr", 0.0) is None or group.get("relative_step") is True


def check_rates(optimizer: Optimizer, factor: float) -> list[int]:
    """Refuse param groups whose learning rate HiFT cannot read or scale; return those that size their own steps.

    A rate is a real number or a one-element tensor (torch's capturable and fused optimizers take both).
    """
    own: list[int] = []
    for index, group in enumerate(optimizer.param_groups):
        if sets_own_step_size(group):
            own.append(index)
            continue
        rate = group.get("lr")
        if _is_rate(rate):
            continue
        what = "no 'lr' entry" if "lr" not in group else f"lr={rate!r}"
        raise HiFTConfigError(
            f"Param group {index} of {type(optimizer).__name__} has {what}. HiFT multiplies a group's learning rate"
            f" by lr_scale and averages it over a cycle, so it must be a number or a one-element tensor (or None,"
            f" for an optimizer that sizes its steps itself). Give the group a numeric lr."
        )
    return own


def factor(scale: LRScale, num_blocks: int) -> float:
    """What an update multiplies the configured learning rates by: ``lr_scale`` for ``num_blocks`` blocks."""
    return float(num_blocks) if scale == "blocks" else float(scale)


def check_scaled_rates(optimizer: Optimizer, factor: float) -> None:
    """:func:`check_rates`, and a warning when ``factor`` cannot apply to groups that size their own steps."""
    own = check_rates(optimizer, factor)
    if own and factor != 1.0:
        rank_zero_warn(
            f"HiFT: {type(optimizer).__name__} sizes its own steps in param groups {own} (lr=None or"
            " relative_step=True), so lr_scale does not apply to them: each block's step size follows the"
            " block's own update count. Give those groups a learning rate (relative_step=False, lr=...) for"
            " lr_scale to take effect, or pass lr_scale=1.0 to silence this warning."
        )


def _is_rate(value: object) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rate(group: dict[str, Any]) -> float | None:
    """The group's learning rate as a number; None where the optimizer sizes its steps itself."""
    if sets_own_step_size(group) or not _is_rate(group.get("lr")):
        return None
    return float(group["lr"])


def _set_rate(group: dict[str, Any], rate: float | None) -> None:
    """Write ``rate`` into the group: in place into a tensor rate (the optimizer may hold that tensor), else as is."""
    if rate is None:
        return
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(rate)
    else:
        group["lr"] = rate


@contextmanager
def scaled(optimizer: Optimizer, factor: float) -> Iterator[None]:
    """Multiply every param group's learning rate by ``factor`` inside the block; the configured rates come back
    after it, exactly, also when it raises. Groups that size their own steps are left alone."""
    if factor == 1.0:
        yield
        return
    groups = [group for group in optimizer.param_groups if _rate(group) is not None]
    configured = [group["lr"] for group in groups]
    values = [float(rate) for rate in configured]
    try:
        for group, value in zip(groups, values, strict=True):
            _set_rate(group, value * factor)
        yield
    finally:
        for group, rate, value in zip(groups, configured, values, strict=True):
            group["lr"] = rate  # the object itself (a float, or the optimizer's tensor) ...
            _set_rate(group, value)  # ... holding its value (a tensor was scaled in place)


@dataclass
class _Plan:
    """The schedule's rates for the steps of one cycle from ``start``, as the look-ahead saw them: one list of
    param-group rates per step. The cycle trains at their mean."""

    start: int
    rates: list[list[float | None]]

    def covers(self, step: int) -> bool:
        return self.start <= step < self.start + len(self.rates)

    def expects(self, step: int, rates: list[float | None]) -> bool:
        """Whether the schedule is at the rates the look-ahead saw for ``step``."""
        return self.covers(step) and self.rates[step - self.start] == rates

    def mean(self) -> list[float | None]:
        means: list[float | None] = []
        for column in zip(*self.rates, strict=True):
            known = [rate for rate in column if rate is not None]
            means.append(sum(known) / len(known) if len(known) == len(column) else None)
        return means


class DelayedLR:
    """Takes over the stepping of step-interval schedulers for the length of a fit.

    It acts on the schedulers Lightning holds at each step: a callback that replaces them mid-fit (such as
    StochasticWeightAveraging's SWALR) gets its own scheduler stepped as Lightning would, and the replaced one is
    released.

    Args:
        mode: one of :data:`MODES`.
    """

    def __init__(self, mode: str) -> None:
        check_mode(mode)
        self.mode = mode
        self._held: list[_Held] = []
        # "cycle": the schedule's own rates, per param group (the groups hold the cycle's mean between steps), and
        # the look-ahead of the cycle being trained.
        self._schedule_rates: list[float | None] = []
        self._plan: _Plan | None = None

    def attach(self, trainer: pl.Trainer, steps_left_in_cycle: int) -> None:
        """Hold back the step-interval schedulers of ``trainer``; ``steps_left_in_cycle`` optimizer steps, the next
        one included, remain in the current cycle."""
        self.detach()
        self._follow(trainer)
        if self.mode == "cycle" and self._held and not (self._plan and self._plan.covers(trainer.global_step)):
            # A new run, or one extended past the end its last cycle was cut at: plan the rest of the cycle.
            if not self._schedule_rates:
                self._schedule_rates = [_rate(group) for group in self._param_groups()]
            self._start_cycle(trainer, steps_left_in_cycle)

    def detach(self) -> None:
        """Give the schedulers back to Lightning as they were configured."""
        for held in self._held:
            held.release()
        self._held = []

    def after_optimizer_step(
        self, trainer: pl.Trainer, cycle_ended: bool, cycles_done: int, steps_left_in_cycle: int
    ) -> None:
        """Account for the optimizer step just taken: step the schedulers as Lightning would have, and move the
        rate the groups hold if a cycle has ended (or the schedule left the look-ahead's path).

        Args:
            trainer: the Trainer.
            cycle_ended: whether the step was the last of a cycle.
            cycles_done: the cycles completed so far.
            steps_left_in_cycle: the optimizer steps of the current cycle still to come, the next one included.
        """
        if self._follow(trainer) and self.mode == "cycle":
            self._plan = None  # a callback replaced the schedulers: their rates are the groups' now
            self._schedule_rates = [_rate(group) for group in self._param_groups()]
        if not self._held:
            return
        if self.mode == "stretched":
            if cycle_ended:
                for held in self._held:
                    if cycles_done % held.frequency == 0:
                        trainer.lightning_module.lr_scheduler_step(held.config.scheduler, None)
            return
        if self.mode != "cycle":
            return
        self._step_as_lightning(trainer)
        step = trainer.global_step
        if cycle_ended or self._plan is None or not self._plan.expects(step, self._schedule_rates):
            # A new cycle; or the schedule went where the look-ahead did not foresee (an epoch of unknown length
            # ended, another callback set the rates): the rest of the cycle trains at the mean of the rest.
            self._start_cycle(trainer, steps_left_in_cycle)
        else:
            self._hold_mean()

    def _step_as_lightning(self, trainer: pl.Trainer) -> None:
        """Step the schedulers where Lightning would have after the step just taken, from the schedule's own rates
        (chainable schedulers compute from the rate the group holds), and note the rates they leave."""
        groups = self._param_groups()
        for group, rate in zip(groups, self._schedule_rates, strict=True):
            _set_rate(group, rate)
        batch = trainer.fit_loop.epoch_loop.batch_idx + 1  # Lightning's own test, at the batch that ended the step
        for held in self._held:
            if batch % held.frequency == 0:
                trainer.lightning_module.lr_scheduler_step(held.config.scheduler, None)
        self._schedule_rates = [_rate(group) for group in groups]

    def _start_cycle(self, trainer: pl.Trainer, steps: int) -> None:
        """Look ahead through the next ``steps`` steps (no further than the run goes) and train them at the mean."""
        start = trainer.global_step
        total = trainer.estimated_stepping_batches
        if total != float("inf"):
            steps = min(steps, int(total) - start)
        if steps < 1:
            self._plan = None
            return
        rates: list[list[float | None]] = []
        groups = self._param_groups()
        with _put_back([held.config.scheduler for held in self._held], groups):
            for group, rate in zip(groups, self._schedule_rates, strict=True):
                _set_rate(group, rate)
            for batch in _step_batches(trainer, steps):
                rates.append([_rate(group) for group in groups])
                if len(rates) < steps:
                    for held in self._held:
                        if batch % held.frequency == 0:
                            trainer.lightning_module.lr_scheduler_step(held.config.scheduler, None)
        self._schedule_rates = rates[0]
        self._plan = _Plan(start, rates)
        self._hold_mean()

    def _hold_mean(self) -> None:
        assert self._plan is not None
        for group, rate in zip(self._param_groups(), self._plan.mean(), strict=True):
            _set_rate(group, rate)

    def _param_groups(self) -> list[dict[str, Any]]:
        optimizers = {id(held.config.scheduler.optimizer): held.config.scheduler.optimizer for held in self._held}
        return [group for optimizer in optimizers.values() for group in optimizer.param_groups]

    def _follow(self, trainer: pl.Trainer) -> bool:
        """Hold exactly the step-interval schedulers that Lightning holds now; whether that changed anything."""
        if self.mode == "step":
            return False
        current = [c for c in trainer.lr_scheduler_configs if c.interval == "step" and not c.reduce_on_plateau]
        changed = False
        for held in [h for h in self._held if not any(h.config is c for c in current)]:
            held.release()  # replaced by someone else, who now sets the rate
            self._held.remove(held)
            changed = True
        for config in current:
            if not any(h.config is config for h in self._held):
                self._held.append(_Held(config))
                changed = True
        return changed

    def state_dict(self) -> dict[str, Any]:
        plan = self._plan
        return {
            "mode": self.mode,
            "schedule_rates": list(self._schedule_rates),
            "plan_start": plan.start if plan is not None else None,
            "plan_rates": [list(rates) for rates in plan.rates] if plan is not None else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise HiFTConfigError(
                f"The checkpoint was written with lr_update={state.get('mode')!r}, this run uses"
                f" lr_update={self.mode!r}. Resume with the same lr_update, or start a new run."
            )
        if "prepared_until" in state:
            raise HiFTConfigError(
                "The checkpoint was written by an earlier development version of lightning_hift, whose"
                " lr_update='cycle' stepped the schedulers ahead of the run; its schedule cannot be continued exactly."
                " Resume it with the version that wrote it, or start a new run from its weights."
            )
        self.detach()
        self._schedule_rates = [None if rate is None else float(rate) for rate in state.get("schedule_rates", [])]
        start = state.get("plan_start")
        self._plan = _Plan(int(start), [list(rates) for rates in state["plan_rates"]]) if start is not None else None


def _step_batches(trainer: pl.Trainer, count: int) -> list[int]:
    """For each of the next ``count`` optimizer steps, the batch (numbered from 1 within its epoch) that ends it, as
    Lightning's loop will run them: every ``accumulate_grad_batches`` batches, and at the last batch of an epoch.

    An epoch of unknown length (an iterable dataset) is taken not to end within the count.
    """
    per_epoch = trainer.num_training_batches
    accumulate = trainer.accumulate_grad_batches
    batch = trainer.fit_loop.epoch_loop.batch_idx + 1  # batches of the current epoch already read
    if batch >= per_epoch:
        batch = 0
    batches: list[int] = []
    while len(batches) < count:
        batch += 1
        if batch % accumulate == 0 or batch == per_epoch:
            batches.append(batch)
            if batch == per_epoch:
                batch = 0
    return batches


@contextmanager
def _put_back(schedulers: Sequence[Any], groups: Sequence[dict[str, Any]]) -> Iterator[None]:
    """Restore the schedulers' state and every param-group entry but the parameters after the block (a look-ahead
    steps them: OneCycleLR also cycles the momentum)."""
    states = [copy.deepcopy(scheduler.state_dict()) for scheduler in schedulers]
    entries = [{key: _copy_value(value) for key, value in group.items() if key != "params"} for group in groups]
    try:
        with warnings.catch_warnings():
            # Stepping ahead of the optimizer is the point here; torch's warning about that order would mislead.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            yield
    finally:
        for scheduler, state in zip(schedulers, states, strict=True):
            scheduler.load_state_dict(state)
        for group, saved in zip(groups, entries, strict=True):
            for key, value in saved.items():
                if isinstance(value, Tensor) and isinstance(group.get(key), Tensor):
                    group[key].copy_(value)  # the optimizer may hold that tensor
                else:
                    group[key] = value


def _copy_value(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else copy.copy(value)


class _Held:
    """A scheduler config whose stepping HiFT has taken over."""

    def __init__(self, config: LRSchedulerConfig) -> None:
        self.config = config
        self.frequency = config.frequency
        config.frequency = _NEVER

    def release(self) -> None:
        self.config.frequency = self.frequency

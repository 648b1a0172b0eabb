"""The delayed learning-rate update: every block of a cycle sees the same learning rate.

HiFT moves the learning rate only between cycles, so that every block of a cycle trains at the same rate. The
user's schedulers stay stock torch schedulers; only *when* Lightning steps the step-interval ones changes. Modes:

``"cycle"``
    A cycle trains at the mean of the rates the schedule gives its steps. When a cycle starts, its schedulers are
    stepped through the cycle's steps ahead of time (so a schedule built for ``max_steps`` still ends at
    ``max_steps``) and the mean of the rates they pass is the rate the cycle trains at. The rate summed over a run
    equals the schedule's, and a warm-up from 0 does not cost a first cycle trained at rate 0.
``"stretched"``
    One scheduler step per cycle, as the paper's reference code did. A schedule built for ``max_steps``
    then runs ``k`` times slower (warm-up included) and never finishes; kept to reproduce published runs.
``"step"``
    No delay: Lightning steps the schedulers as usual.

Epoch-interval schedulers and ReduceLROnPlateau are left to Lightning in every mode.

Separately, ``lr_scale`` multiplies the rates for the length of each update (:func:`scaled`): a block trains in
1/k of the steps, so at a full fine-tuning recipe's rate it would move about k times less over a run than under full
fine-tuning. The schedulers and checkpoints only ever see the configured rates.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

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


@contextmanager
def scaled(optimizer: Optimizer, factor: float) -> Iterator[None]:
    """Multiply every param group's learning rate by ``factor`` inside the block; the configured rates come back
    after it, exactly (the objects themselves), also when it raises."""
    if factor == 1.0:
        yield
        return
    configured = [group["lr"] for group in optimizer.param_groups]
    try:
        for group, rate in zip(optimizer.param_groups, configured, strict=True):
            group["lr"] = rate * factor
        yield
    finally:
        for group, rate in zip(optimizer.param_groups, configured, strict=True):
            group["lr"] = rate


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
        self._cycle_steps = 1
        # "cycle": the global step the prepared cycle ends at, and each optimizer's schedule rates for that step
        # (its param groups hold the cycle's mean meanwhile).
        self._prepared_until = 0
        self._schedule_rates: list[float] = []

    def attach(self, trainer: pl.Trainer, cycle_steps: int) -> None:
        """Hold back the step-interval schedulers of ``trainer``; a cycle is ``cycle_steps`` optimizer steps."""
        self.detach()
        self._cycle_steps = cycle_steps
        self._follow(trainer)
        if self.mode == "cycle" and trainer.global_step >= self._prepared_until:
            self._start_cycle(trainer)

    def detach(self) -> None:
        """Give the schedulers back to Lightning as they were configured."""
        for held in self._held:
            held.release()
        self._held = []

    def after_optimizer_step(self, trainer: pl.Trainer, cycle_ended: bool) -> None:
        """Account for the optimizer step just taken and move the rates if the cycle has ended."""
        self._follow(trainer)
        if not cycle_ended:
            return
        if self.mode == "cycle":
            self._start_cycle(trainer)
        elif self.mode == "stretched":
            for held in self._held:
                trainer.lightning_module.lr_scheduler_step(held.config.scheduler, None)

    def _start_cycle(self, trainer: pl.Trainer) -> None:
        """Step the schedulers through the coming cycle and train it at the mean of the rates they pass."""
        groups = self._param_groups()
        if self._schedule_rates:  # the previous cycle's mean is in the groups: give the schedulers their own rates
            for group, rate in zip(groups, self._schedule_rates, strict=True):
                group["lr"] = rate
        start = trainer.global_step
        steps = self._cycle_steps
        total = trainer.estimated_stepping_batches
        if total != float("inf"):  # no schedule step beyond the run (OneCycleLR refuses them)
            steps = max(0, min(steps, int(total) - start))
        rates: list[list[float]] = []
        with warnings.catch_warnings():
            # Stepping ahead of the optimizer is the point here; torch's warning about that order would mislead.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            for step in range(start + 1, start + steps + 1):
                rates.append([group["lr"] for group in groups])
                for held in self._held:
                    if step % held.frequency == 0:
                        trainer.lightning_module.lr_scheduler_step(held.config.scheduler, None)
        self._schedule_rates = [group["lr"] for group in groups]
        self._prepared_until = start + steps
        if rates:
            for group, cycle_rates in zip(groups, zip(*rates, strict=True), strict=True):
                group["lr"] = sum(cycle_rates) / len(cycle_rates)

    def _param_groups(self) -> list[dict[str, Any]]:
        optimizers = {id(held.config.scheduler.optimizer): held.config.scheduler.optimizer for held in self._held}
        return [group for optimizer in optimizers.values() for group in optimizer.param_groups]

    def _follow(self, trainer: pl.Trainer) -> None:
        """Hold exactly the step-interval schedulers that Lightning holds now."""
        if self.mode == "step":
            return
        current = [c for c in trainer.lr_scheduler_configs if c.interval == "step" and not c.reduce_on_plateau]
        for held in [h for h in self._held if not any(h.config is c for c in current)]:
            held.release()  # replaced by someone else, who now sets the rate
            self._held.remove(held)
            self._schedule_rates = []
        for config in current:
            if not any(h.config is config for h in self._held):
                self._held.append(_Held(config))

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "prepared_until": self._prepared_until, "schedule_rates": self._schedule_rates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise HiFTConfigError(
                f"The checkpoint was written with lr_update={state.get('mode')!r}, this run uses"
                f" lr_update={self.mode!r}. Resume with the same lr_update, or start a new run."
            )
        self.detach()
        self._prepared_until = int(state.get("prepared_until", 0))
        self._schedule_rates = [float(rate) for rate in state.get("schedule_rates", [])]


class _Held:
    """A scheduler config whose stepping HiFT has taken over."""

    def __init__(self, config: LRSchedulerConfig) -> None:
        self.config = config
        self.frequency = config.frequency
        config.frequency = _NEVER

    def release(self) -> None:
        self.config.frequency = self.frequency

"""The delayed learning-rate update: every block of a cycle sees the same learning rate.

HiFT moves the learning rate only when every block has been updated once. The user's schedulers stay
stock torch schedulers; only *when* Lightning steps the step-interval ones changes. Modes:

``"cycle"``
    The learning rate is held for a cycle; when the cycle ends the scheduler is stepped once for every
    optimizer step of the cycle, so a schedule built for ``max_steps`` still ends at ``max_steps``.
``"stretched"``
    One scheduler step per cycle, as the paper's reference code did. A schedule built for ``max_steps``
    then runs ``k`` times slower (warm-up included) and never finishes; kept to reproduce published runs.
``"step"``
    No delay: Lightning steps the schedulers as usual.

Epoch-interval schedulers and ReduceLROnPlateau are left to Lightning in every mode.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal

from lightning_hift.errors import HiFTConfigError

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.types import LRSchedulerConfig

LRUpdate = Literal["cycle", "stretched", "step"]
MODES: tuple[str, ...] = ("cycle", "stretched", "step")

# Lightning steps a step-interval scheduler when `(batch_idx + 1) % frequency == 0`; with this frequency it never
# does, and the scheduler keeps interval="step" so LearningRateMonitor still logs it every step.
_NEVER = sys.maxsize


def check_mode(mode: str) -> None:
    if not isinstance(mode, str) or mode not in MODES:
        raise HiFTConfigError(f"Unknown lr_update={mode!r}. Choose one of {list(MODES)}.")


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
        self._owed_detached: list[int] = []  # what the held schedulers were owed when last detached or loaded

    def attach(self, trainer: pl.Trainer) -> None:
        """Hold back the step-interval schedulers of ``trainer`` from Lightning's own stepping."""
        owed = self.state_dict()["owed"]
        self.detach()
        self._follow(trainer)
        if len(owed) == len(self._held):
            for held, steps in zip(self._held, owed, strict=True):
                held.owed = steps

    def detach(self) -> None:
        """Give the schedulers back to Lightning as they were configured; what they are owed is kept."""
        if self._held:
            self._owed_detached = [held.owed for held in self._held]
        for held in self._held:
            held.release()
        self._held = []

    def after_optimizer_step(self, trainer: pl.Trainer, cycle_ended: bool) -> None:
        """Account for the optimizer step just taken and step the schedulers if the cycle has ended."""
        self._follow(trainer)
        for held in self._held:
            if self.mode == "cycle" and trainer.global_step % held.frequency == 0:
                held.owed += 1
            if not cycle_ended:
                continue
            steps = held.owed if self.mode == "cycle" else 1
            for _ in range(steps):
                trainer.lightning_module.lr_scheduler_step(held.config.scheduler, None)
            held.owed = 0

    def _follow(self, trainer: pl.Trainer) -> None:
        """Hold exactly the step-interval schedulers that Lightning holds now."""
        if self.mode == "step":
            return
        current = [c for c in trainer.lr_scheduler_configs if c.interval == "step" and not c.reduce_on_plateau]
        for held in [h for h in self._held if not any(h.config is c for c in current)]:
            held.release()  # replaced by someone else: what it was owed goes with it
            self._held.remove(held)
        for config in current:
            if not any(h.config is config for h in self._held):
                self._held.append(_Held(config))

    def state_dict(self) -> dict[str, Any]:
        owed = [held.owed for held in self._held] if self._held else list(self._owed_detached)
        return {"mode": self.mode, "owed": owed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise HiFTConfigError(
                f"The checkpoint was written with lr_update={state.get('mode')!r}, this run uses"
                f" lr_update={self.mode!r}. Resume with the same lr_update, or start a new run."
            )
        self.detach()
        self._owed_detached = [int(n) for n in state["owed"]]


class _Held:
    """A scheduler config whose stepping HiFT has taken over, and the steps it is owed."""

    def __init__(self, config: LRSchedulerConfig) -> None:
        self.config = config
        self.frequency = config.frequency
        self.owed = 0
        config.frequency = _NEVER

    def release(self) -> None:
        self.config.frequency = self.frequency

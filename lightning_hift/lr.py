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
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.types import LRSchedulerConfig

from lightning_hift.errors import HiFTConfigError

MODES: tuple[str, ...] = ("cycle", "stretched", "step")

# Lightning steps a step-interval scheduler when `(batch_idx + 1) % frequency == 0`; with this frequency it never
# does, and the scheduler keeps interval="step" so LearningRateMonitor still logs it every step.
_NEVER = sys.maxsize


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise HiFTConfigError(f"Unknown lr_update={mode!r}. Choose one of {list(MODES)}.")


class DelayedLR:
    """Takes over the stepping of step-interval schedulers for the length of a fit.

    Args:
        mode: one of :data:`MODES`.
    """

    def __init__(self, mode: str) -> None:
        check_mode(mode)
        self.mode = mode
        self._held: list[tuple[LRSchedulerConfig, int]] = []
        self._owed: list[int] = []

    def attach(self, trainer: pl.Trainer) -> None:
        """Hold back the step-interval schedulers of ``trainer`` from Lightning's own stepping."""
        self.detach()
        if self.mode == "step":
            return
        for config in trainer.lr_scheduler_configs:
            if config.interval == "step" and not config.reduce_on_plateau:
                self._held.append((config, config.frequency))
                config.frequency = _NEVER
        if len(self._owed) != len(self._held):
            self._owed = [0] * len(self._held)

    def detach(self) -> None:
        """Give the schedulers back to Lightning as they were configured."""
        for config, frequency in self._held:
            config.frequency = frequency
        self._held = []

    def after_optimizer_step(self, trainer: pl.Trainer, cycle_ended: bool) -> None:
        """Account for the optimizer step just taken and step the schedulers if the cycle has ended."""
        for i, (config, frequency) in enumerate(self._held):
            if self.mode == "cycle" and trainer.global_step % frequency == 0:
                self._owed[i] += 1
            if not cycle_ended:
                continue
            steps = self._owed[i] if self.mode == "cycle" else 1
            for _ in range(steps):
                trainer.lightning_module.lr_scheduler_step(config.scheduler, None)
            self._owed[i] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "owed": list(self._owed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise HiFTConfigError(
                f"The checkpoint was written with lr_update={state.get('mode')!r}, this run uses"
                f" lr_update={self.mode!r}. Resume with the same lr_update, or start a new run."
            )
        self._owed = [int(n) for n in state["owed"]]

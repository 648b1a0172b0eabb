"""Wall-clock time per optimizer step, for comparing strategies."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class StepTimer(Callback):
    """Records the seconds each optimizer step takes, from the start of its first batch to the end of its last.

    Data loading between batches is left out; with ``accumulate_grad_batches=N`` one step spans N batches.

    Example:
        >>> timer = StepTimer()
        >>> # Trainer(callbacks=[timer]).fit(...); then timer.median_seconds
        >>> timer.seconds
        []
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started: float | None = None
        self._last_step = 0

    @property
    def median_seconds(self) -> float:
        """Median seconds per optimizer step; robust to the slow first step and to stray pauses.

        Raises:
            RuntimeError: No step has been timed yet.
        """
        if not self.seconds:
            raise RuntimeError("StepTimer has timed no optimizer step; pass it to a Trainer in callbacks and fit.")
        return statistics.median(self.seconds)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._started is None:
            self._synchronize(pl_module)
            self._started = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Batches that only accumulate gradients leave global_step unchanged; the step ends with its last batch.
        if self._started is None or trainer.global_step == self._last_step:
            return
        self._synchronize(pl_module)
        self.seconds.append(time.perf_counter() - self._started)
        self._started = None
        self._last_step = trainer.global_step

    @staticmethod
    def _synchronize(pl_module: LightningModule) -> None:
        # CUDA kernels run asynchronously; without waiting, the clock would measure only the kernel launches.
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

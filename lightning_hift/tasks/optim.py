"""The optimizer and learning-rate schedule that every demo task module shares."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

OptimizerFactory = Callable[..., Optimizer]
"""Called as ``factory(param_groups, lr=lr)``: an optimizer class, or a ``functools.partial`` of one."""


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear rise to 1 over ``warmup_steps``, then linear fall towards 0 at ``total_steps``.

    The first step already gets a non-zero rate, so no step (and, block-wise, no block's turn) is wasted.

    Example:
        >>> [round(linear_warmup_decay(step, 2, 6), 2) for step in range(6)]
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def decay_param_groups(named_params: Iterable[tuple[str, Tensor]], weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters into a weight-decayed group (matrices, embeddings) and an undecayed one (biases, norms).

    Every parameter is included, trainable right now or not: a block-wise strategy switches ``requires_grad``
    from step to step, and the optimizer must already know the parameters it will be handed.
    """
    params = [param for _, param in named_params]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def check_schedule_arguments(lr: float, warmup_ratio: float) -> None:
    """Reject a learning rate or warm-up fraction that :func:`configure_warmup_decay` cannot use.

    Raises:
        ValueError: ``lr`` is not positive, or ``warmup_ratio`` lies outside ``[0, 1)``.
    """
    if lr <= 0:
        raise ValueError(f"lr={lr}: the learning rate must be positive.")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio={warmup_ratio}: pass a fraction in [0, 1).")


def configure_warmup_decay(
    model: nn.Module,
    optimizer: OptimizerFactory,
    *,
    lr: float,
    weight_decay: float,
    warmup_ratio: float,
    total_steps: float,
) -> OptimizerLRSchedulerConfig:
    """The optimizer over all of ``model``'s parameters, with a linear warm-up and decay stepped every step.

    The result is what ``LightningModule.configure_optimizers`` returns; the schedule is :func:`linear_warmup_decay`.

    Args:
        model: The module whose parameters are optimized, split by :func:`decay_param_groups`.
        optimizer: Called as ``optimizer(param_groups, lr=lr)``.
        lr: Peak learning rate.
        weight_decay: Weight decay of parameters with two or more dimensions.
        warmup_ratio: Fraction of ``total_steps`` spent warming up.
        total_steps: Optimizer steps of the run, normally ``trainer.estimated_stepping_batches``.

    Raises:
        ValueError: ``total_steps`` is infinite (set ``max_steps`` or ``max_epochs`` on the Trainer).
    """
    if not math.isfinite(total_steps):
        raise ValueError("The learning-rate schedule needs a finite run; set max_steps or max_epochs on the Trainer.")
    steps = int(total_steps)
    warmup_steps = math.ceil(warmup_ratio * steps)
    built = optimizer(decay_param_groups(model.named_parameters(), weight_decay), lr=lr)
    schedule = partial(linear_warmup_decay, warmup_steps=warmup_steps, total_steps=steps)
    return {"optimizer": built, "lr_scheduler": {"scheduler": LambdaLR(built, schedule), "interval": "step"}}


class WarmupDecayModule(LightningModule):
    """Base of the task modules: ``configure_optimizers`` from ``self.model``, ``self.optimizer_factory`` and the
    ``lr``, ``weight_decay`` and ``warmup_ratio`` hyperparameters, as :func:`configure_warmup_decay` builds it."""

    model: nn.Module
    optimizer_factory: OptimizerFactory

    def adopt(self, model: nn.Module, optimizer: OptimizerFactory) -> None:
        """Take ``model`` (in training mode) and the optimizer factory that ``configure_optimizers`` calls."""
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode, so dropout would stay off.
        model.train()
        self.model = model
        self.optimizer_factory = optimizer

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """The optimizer over all parameters, with a linear warm-up and decay stepped every optimizer step.

        Raises:
            ValueError: The Trainer has no finite length (set ``max_steps`` or ``max_epochs``).
        """
        return configure_warmup_decay(
            self.model,
            self.optimizer_factory,
            lr=self.hparams["lr"],
            weight_decay=self.hparams["weight_decay"],
            warmup_ratio=self.hparams["warmup_ratio"],
            total_steps=self.trainer.estimated_stepping_batches,
        )

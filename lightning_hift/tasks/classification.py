"""A LightningModule that fine-tunes a transformers sequence classifier."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import PreTrainedModel

from lightning_hift.tasks.models import load_sequence_classifier

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


class SequenceClassifier(LightningModule):
    """Fine-tunes a transformers ``...ForSequenceClassification`` model on batches of token ids and labels.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels``. Logs ``train/loss``, and accuracy and
    macro-F1 as ``val/acc``, ``val/f1``, ``test/acc``, ``test/f1``.

    Args:
        model: A sequence-classification model, or a name for
            :func:`lightning_hift.tasks.models.load_sequence_classifier` (``"minilm"``, a folder, a hub name).
        num_labels: Number of classes; required when ``model`` is a name, read from the model otherwise.
        lr: Peak learning rate. Block-wise training (``strategy="hift"``) updates each block only once every
            few steps, so it wants a larger rate than full fine-tuning (about 2e-4 against 5e-5 for MiniLM).
        weight_decay: Decoupled weight decay of parameters with two or more dimensions.
        warmup_ratio: Fraction of the optimizer steps spent rising linearly to ``lr``; the rest decays linearly.
        optimizer: Builds the optimizer from the parameter groups and ``lr``, e.g.
            ``functools.partial(torch.optim.SGD, momentum=0.9)``.

    Example:
        >>> from functools import partial
        >>> module = SequenceClassifier("minilm", num_labels=2, optimizer=partial(torch.optim.Adam))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        num_labels: int | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        optimizer: OptimizerFactory = torch.optim.AdamW,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr={lr}: the learning rate must be positive.")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={warmup_ratio}: pass a fraction in [0, 1).")
        if isinstance(model, str):
            if num_labels is None:
                raise ValueError(f"model={model!r} is a name, so pass num_labels too.")
            model = load_sequence_classifier(model, num_labels)
        num_classes = model.config.num_labels
        if num_labels is not None and num_labels != num_classes:
            raise ValueError(f"num_labels={num_labels} but the model's head has {num_classes} outputs.")
        # transformers treats a single output as regression, which the loss and metrics here do not handle.
        if num_classes is None or num_classes < 2:
            raise ValueError(f"The model's head has {num_classes} outputs; load it with num_labels >= 2.")
        self.save_hyperparameters(ignore=["model", "optimizer"])
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode, so dropout would stay off.
        model.train()
        self.model = model
        self.optimizer_factory = optimizer
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, batch: dict[str, Tensor]) -> Any:
        """Run the wrapped model; with ``labels`` in the batch the output carries ``loss`` and ``logits``."""
        return self.model(**batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss: Tensor = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """The optimizer over all parameters, with a linear warm-up and decay stepped every optimizer step.

        Raises:
            ValueError: The Trainer has no finite length (set ``max_steps`` or ``max_epochs``).
        """
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "The learning-rate schedule needs a finite run; set max_steps or max_epochs on the Trainer."
            )
        total_steps = int(total)
        warmup_steps = math.ceil(self.hparams["warmup_ratio"] * total_steps)
        groups = decay_param_groups(self.model.named_parameters(), self.hparams["weight_decay"])
        optimizer = self.optimizer_factory(groups, lr=self.hparams["lr"])
        schedule = partial(linear_warmup_decay, warmup_steps=warmup_steps, total_steps=total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }

    def _evaluate(self, batch: dict[str, Tensor], metrics: MetricCollection) -> None:
        logits = self(batch).logits
        metrics.update(logits, batch["labels"])
        self.log_dict(metrics, batch_size=len(batch["labels"]))

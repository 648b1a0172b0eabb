"""A LightningModule that fine-tunes a transformers sequence classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef
from transformers import PreTrainedModel

from lightning_hift.tasks.models import load_sequence_classifier
from lightning_hift.tasks.optim import OptimizerFactory, WarmupDecayModule, check_schedule_arguments


class SequenceClassifier(WarmupDecayModule):
    """Fine-tunes a transformers ``...ForSequenceClassification`` model on batches of token ids and labels.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels``. Logs ``train/loss``, and accuracy,
    macro-F1 and Matthews correlation as ``val/acc``, ``val/f1``, ``val/mcc`` and likewise under ``test/``.

    Args:
        model: A sequence-classification model, or a name for
            :func:`lightning_hift.tasks.models.load_sequence_classifier` (``"minilm"``, a folder, a hub name).
        num_labels: Number of classes; required when ``model`` is a name, read from the model otherwise.
        lr: Peak learning rate, a full fine-tuning rate (5e-5 for MiniLM) also under ``strategy="hift"``, whose
            ``lr_scale="blocks"`` multiplies it by the number of blocks in each update.
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
        check_schedule_arguments(lr, warmup_ratio)
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
        self.adopt(model, optimizer)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
                "mcc": MulticlassMatthewsCorrCoef(num_classes),
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

    def _evaluate(self, batch: dict[str, Tensor], metrics: MetricCollection) -> None:
        logits = self(batch).logits
        metrics.update(logits, batch["labels"])
        self.log_dict(metrics, batch_size=len(batch["labels"]))

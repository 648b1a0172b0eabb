"""A LightningModule that fine-tunes a transformers causal (decoder-only) language model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.text import Perplexity
from transformers import PreTrainedModel

from lightning_hift.tasks.models import load_causal_lm
from lightning_hift.tasks.optim import OptimizerFactory, WarmupDecayModule, check_schedule_arguments

IGNORE_INDEX = -100
"""Label value that the loss and the perplexity skip (the transformers convention)."""


def mask_padding_labels(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Return ``batch`` with ``labels`` set to :data:`IGNORE_INDEX` wherever ``attention_mask`` is 0.

    A batch without ``labels`` scores every token of ``input_ids``; one without ``attention_mask`` keeps its labels.

    Example:
        >>> batch = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
        >>> mask_padding_labels(batch)["labels"]
        tensor([[   5,    6, -100]])
    """
    labels = batch.get("labels", batch["input_ids"])
    if "attention_mask" in batch:
        # Collators often copy input_ids to labels, padding included; padding must never be scored.
        labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return batch | {"labels": labels}


class CausalLanguageModel(WarmupDecayModule):
    """Fine-tunes a transformers ``...ForCausalLM`` model on next-token prediction.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels``, padded on the right; labels of
    :data:`IGNORE_INDEX` (-100) are not scored, nor is any position whose ``attention_mask`` is 0. The model shifts
    the labels itself, so ``labels`` may simply be a copy of ``input_ids``. Logs ``train/loss``, ``val/loss``,
    ``val/ppl``, ``test/loss`` and ``test/ppl``; evaluation losses are means over scored tokens, so
    ``ppl == exp(loss)``.

    Args:
        model: A causal language model, or a name for :func:`lightning_hift.tasks.models.load_causal_lm`
            (``"smollm2"``, a folder, a hub name).
        lr: Peak learning rate, a full fine-tuning rate also under ``strategy="hift"``, whose
            ``lr_scale="blocks"`` multiplies it by the number of blocks in each update.
        weight_decay: Decoupled weight decay of parameters with two or more dimensions.
        warmup_ratio: Fraction of the optimizer steps spent rising linearly to ``lr``; the rest decays linearly.
        optimizer: Builds the optimizer from the parameter groups and ``lr``, e.g.
            ``functools.partial(torch.optim.SGD, momentum=0.9)`` or ``transformers.Adafactor`` (with
            ``scale_parameter=False, relative_step=False``).

    Example:
        >>> module = CausalLanguageModel("smollm2", lr=1e-4)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        optimizer: OptimizerFactory = torch.optim.AdamW,
    ) -> None:
        super().__init__()
        check_schedule_arguments(lr, warmup_ratio)
        if isinstance(model, str):
            model = load_causal_lm(model)
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.adopt(model, optimizer)
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    def forward(self, batch: dict[str, Tensor]) -> Any:
        """Run the wrapped model with padding masked out of the labels; the output carries ``loss`` and ``logits``."""
        return self.model(**mask_padding_labels(batch))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss: Tensor = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_ppl, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_ppl, "test")

    def _evaluate(self, batch: dict[str, Tensor], perplexity: Perplexity, stage: str) -> None:
        batch = mask_padding_labels(batch)
        output = self(batch)
        # Position t predicts token t + 1, the shift the model's own loss applies.
        targets = batch["labels"][:, 1:]
        # Upcast: a softmax over a large vocabulary in half precision loses the small probabilities perplexity needs.
        perplexity.update(output.logits[:, :-1].float(), targets)
        # Weighting each batch's mean loss by its scored tokens makes the epoch loss a per-token mean, like ppl.
        tokens = int(targets.ne(IGNORE_INDEX).sum())
        self.log(f"{stage}/loss", output.loss, batch_size=tokens)
        self.log(f"{stage}/ppl", perplexity, batch_size=tokens)

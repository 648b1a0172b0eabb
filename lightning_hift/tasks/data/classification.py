"""The base of the text classification data modules: tokenize once in ``setup``, batch with dynamic padding."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from lightning_hift.tasks.data.common import Example, TokenizedSplit, check_positive, resolve_tokenizer

SPLITS = ("train", "val", "test")


class ClassificationDataModule(LightningDataModule, ABC):
    """Texts with class labels, split into fixed train / val / test sets and tokenized once.

    Batches are dicts of ``input_ids``, ``attention_mask`` (padded to the longest text of the batch) and
    ``labels`` (class indices). Subclasses set ``classes`` and implement :meth:`read_splits`.

    Args:
        tokenizer: A tokenizer, or a name for :func:`lightning_hift.tasks.models.load_tokenizer` (``"minilm"``).
        batch_size: Training batch size.
        eval_batch_size: Validation and test batch size (no gradients, so it can be larger).
        max_length: Tokens per text; longer texts are truncated.
        seed: Seed of the splits and of the training shuffle.
        num_workers: DataLoader workers; batches are cheap to build, so 0 is usually fastest.
    """

    classes: tuple[str, ...]
    """Class names; a label's index here is its class index."""

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        batch_size: int,
        eval_batch_size: int,
        max_length: int,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        check_positive(batch_size=batch_size, eval_batch_size=eval_batch_size, max_length=max_length)
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: it must be 0 or more.")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.seed = seed
        self.num_workers = num_workers
        self.splits: dict[str, TokenizedSplit] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes, for the classifier head."""
        return len(self.classes)

    @abstractmethod
    def read_splits(self) -> tuple[list[Example], list[Example], list[Example]]:
        """Read the data and return the train, val and test examples; the same every call for one seed."""

    def setup(self, stage: str) -> None:
        """Read, split and tokenize the data; every stage shares the result, so it runs once."""
        if self.splits:
            return
        examples = self.read_splits()
        tokenizer = self._tokenizer()
        self.splits = {
            split: TokenizedSplit(part, tokenizer, self.max_length)
            for split, part in zip(SPLITS, examples, strict=True)
        }

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Shuffled training batches, in an order fixed by ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader("train", self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Validation batches in a fixed order."""
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Test batches in a fixed order."""
        return self._loader("test", self.eval_batch_size)

    def _tokenizer(self) -> PreTrainedTokenizerBase:
        if isinstance(self.tokenizer, str) or self.tokenizer.pad_token is None:
            self.tokenizer = resolve_tokenizer(self.tokenizer)
        if self.tokenizer.pad_token is None:
            raise ValueError(
                f"Tokenizer {self.tokenizer.name_or_path!r} has neither a pad nor an eos token to pad batches with; "
                "set tokenizer.pad_token before passing it."
            )
        return self.tokenizer

    def _loader(self, split: str, batch_size: int, **kwargs: Any) -> DataLoader[dict[str, Any]]:
        if split not in self.splits:
            raise RuntimeError(f"The {split} split is not built yet; call setup() first (the Trainer does).")
        # Pads each batch only to its own longest text; most texts are shorter than max_length.
        collate = DataCollatorWithPadding(self._tokenizer(), return_tensors="pt")
        return DataLoader(
            self.splits[split], batch_size=batch_size, collate_fn=collate, num_workers=self.num_workers, **kwargs
        )

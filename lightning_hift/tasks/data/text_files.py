"""Classification data from the user's own CSV or JSON Lines files."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lightning_hift.tasks.data.classification import ClassificationDataModule
from lightning_hift.tasks.data.common import Example, split_examples
from lightning_hift.tasks.data.tables import check_table_path, read_table
from lightning_hift.tasks.models import MINILM

Labelled = tuple[int, int, str, str]
"""Row number, line, text and label value of one row, before labels become class indices."""


def sort_labels(values: set[str]) -> tuple[str, ...]:
    """Sort label values, numerically when all are integers, so labels ``0..10`` keep their own indices."""
    if all(value.lstrip("-").isdigit() for value in values):
        return tuple(sorted(values, key=int))
    return tuple(sorted(values))


class TextFileDataModule(ClassificationDataModule):
    """Labelled texts from ``.csv`` (with a header) or ``.jsonl`` (one object per line) files.

    Without ``val_file`` / ``test_file`` the missing splits are cut from the training file by ``val_fraction`` /
    ``test_fraction`` with ``seed`` (test first, then val, so one fraction never moves the other split).

    Args:
        train_file: Training rows; the format follows the extension.
        tokenizer: A tokenizer, or a name for :func:`lightning_hift.tasks.models.load_tokenizer` (``"minilm"``).
        val_file: Validation rows; ``None`` cuts them from ``train_file``.
        test_file: Test rows; ``None`` cuts them from ``train_file``.
        text_column: Column holding the text.
        label_column: Column holding the label.
        labels: All label values in class-index order; ``None`` uses the sorted values found in ``train_file``
            (then :attr:`classes` is filled by :meth:`setup` or the first use of :attr:`num_classes`).
        val_fraction: Share of ``train_file`` rows held out for validation when there is no ``val_file``.
        test_fraction: Share of ``train_file`` rows held out for testing when there is no ``test_file``.
        batch_size: Training batch size.
        eval_batch_size: Validation and test batch size (no gradients, so it can be larger).
        max_length: Tokens per text; longer texts are truncated.
        seed: Seed of the splits and of the training shuffle.
        num_workers: DataLoader workers; batches are cheap to build, so 0 is usually fastest.

    Example:
        >>> data = TextFileDataModule("reviews.csv", text_column="review", label_column="stars")  # doctest: +SKIP
        >>> data.setup("fit")  # doctest: +SKIP
        >>> data.num_classes  # doctest: +SKIP
        5
    """

    def __init__(
        self,
        train_file: str | Path,
        tokenizer: str | PreTrainedTokenizerBase = MINILM,
        val_file: str | Path | None = None,
        test_file: str | Path | None = None,
        text_column: str = "text",
        label_column: str = "label",
        labels: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        max_length: int = 128,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(tokenizer, batch_size, eval_batch_size, max_length, seed, num_workers)
        files = {"train_file": train_file, "val_file": val_file, "test_file": test_file}
        self.files = {name: check_table_path(path, name) for name, path in files.items() if path is not None}
        if text_column == label_column:
            raise ValueError(f"text_column and label_column are both {text_column!r}; name two different columns.")
        if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
            raise ValueError(f"labels={tuple(labels)}: pass at least two distinct labels, or None to infer them.")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"{name}={value}: it must be at least 0 and below 1.")
        held_out = (val_file is None) * val_fraction + (test_file is None) * test_fraction
        if held_out >= 1:
            raise ValueError(f"val_fraction + test_fraction = {held_out} leaves no training rows; make it below 1.")
        self.text_column = text_column
        self.label_column = label_column
        self.classes = tuple(labels) if labels is not None else ()
        self.fractions = (test_fraction if test_file is None else 0.0, val_fraction if val_file is None else 0.0)

    @property
    def num_classes(self) -> int:
        """Number of classes, for the classifier head; without ``labels`` it reads them from ``train_file``."""
        if not self.classes:
            self._infer_classes(self._read("train_file"))
        return len(self.classes)

    def read_splits(self) -> tuple[list[Example], list[Example], list[Example]]:
        """Read the files, settle the classes, and cut the splits that have no file of their own."""
        rows = self._read("train_file")
        if not self.classes:
            self._infer_classes(rows)
        examples = self._examples("train_file", rows)
        test_size, val_size = (round(len(examples) * fraction) for fraction in self.fractions)
        train_size = len(examples) - test_size - val_size
        if train_size < 1:
            raise ValueError(
                f"{self.files['train_file']} has {len(examples)} rows; the val and test fractions leave none to "
                "train on. Add rows, lower the fractions, or pass val_file and test_file."
            )
        test, val, train = split_examples(examples, (test_size, val_size, train_size), random.Random(self.seed))
        if "val_file" in self.files:
            val = self._examples("val_file", self._read("val_file"))
        if "test_file" in self.files:
            test = self._examples("test_file", self._read("test_file"))
        return train, val, test

    def _infer_classes(self, rows: list[Labelled]) -> None:
        classes = sort_labels({label for *_, label in rows})
        if len(classes) < 2:
            raise ValueError(
                f"{self.files['train_file']} column {self.label_column!r} holds only the label {classes[0]!r}; "
                "a classifier needs at least two classes."
            )
        self.classes = classes

    def _read(self, argument: str) -> list[Labelled]:
        path = self.files[argument]
        hint = "Set text_column and label_column to the columns to use."
        rows = []
        for row in read_table(path, (self.text_column, self.label_column), hint):
            text, label = row.cells[self.text_column], row.cells[self.label_column]
            for column, value in ((self.text_column, text), (self.label_column, label)):
                if not value.strip():
                    raise ValueError(
                        f"{path} row {row.number} (line {row.line}): the {column!r} cell is empty; "
                        "fill it in or delete the row."
                    )
            rows.append((row.number, row.line, text, label.strip()))
        return rows

    def _examples(self, argument: str, rows: list[Labelled]) -> list[Example]:
        index = {label: i for i, label in enumerate(self.classes)}
        for number, line, _, label in rows:
            if label not in index:
                raise ValueError(
                    f"{self.files[argument]} row {number} (line {line}): column {self.label_column!r} holds "
                    f"{label!r}, which is not one of the labels {list(self.classes)}; fix the row or add the label."
                )
        return [(text, index[label]) for _, _, text, label in rows]

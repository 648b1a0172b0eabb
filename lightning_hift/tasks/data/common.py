"""What the text data modules share: argument checks, decoding, tokenizer loading, splitting, tokenized splits."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lightning_hift.tasks.models import load_tokenizer

Example = tuple[str, int]
"""A text and the index of its class."""


def packaged_file(package: str, relative: Path, install: str, instead: str) -> Path:
    """``relative`` inside an installed package's folder, found without importing the package.

    The data packages are installed without their dependencies, and some fail to import or start downloads
    for corpora that are not wanted here; only their files are read.

    Raises:
        FileNotFoundError: The package is not installed or lacks the file; the message says to run ``install``
            or to pass ``instead``.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The package {package} is not installed; run `{install}` or pass {instead}.")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall it with `{install}` or pass {instead}.")
    return path


def check_positive(**values: int) -> None:
    """Raise a ``ValueError`` naming the first keyword argument below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value}: it must be at least 1.")


def decode_text(data: bytes) -> str:
    """Decode file contents as UTF-8 (dropping a byte-order mark), else as latin-1.

    Spreadsheet exports start with a byte-order mark that would otherwise glue itself to the first column name,
    and some shipped corpora hold stray non-UTF-8 bytes (a latin-1 pound sign); latin-1 decodes every byte, so no
    text is lost.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def resolve_tokenizer(tokenizer: str | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Load ``tokenizer`` if it is a name (see :func:`lightning_hift.tasks.models.load_tokenizer`).

    Causal-LM tokenizers ship without a pad token; it is set to the eos token, which is safe because padded
    positions are masked out of attention and of the loss.
    """
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
        self.input_ids: list[list[int]] = []
        self.attention_mask: list[list[int]] = []
        # Fast tokenizers fail on an empty batch, and a zero val_fraction leaves an empty split.
        if examples:
            # token_type_ids are all zero for single texts and many model families reject them, so leave them out.
            encoded = tokenizer(
                [text for text, _ in examples], truncation=True, max_length=max_length, return_token_type_ids=False
            )
            self.input_ids, self.attention_mask = encoded["input_ids"], encoded["attention_mask"]
        self.labels = [label for _, label in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }

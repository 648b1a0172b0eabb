"""The manual's API reference covers every public name; `make docs` checks that its links and references resolve."""

from __future__ import annotations

import re
from pathlib import Path

import lightning_hift
import lightning_hift.memory
import lightning_hift.tasks

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"


def documented() -> set[str]:
    """The objects the reference pages render (``::: path``)."""
    pages = "\n".join(page.read_text() for page in REFERENCE.glob("*.md"))
    return set(re.findall(r"^::: ([\w.]+)", pages, flags=re.MULTILINE))


def test_every_public_name_has_an_entry_in_the_api_reference() -> None:
    entries = documented()
    # The planner's and the demo tasks' packages are rendered whole: each name of their __all__ has its entry there.
    whole = (lightning_hift.memory, lightning_hift.tasks)
    assert all(module.__name__ in entries for module in whole)
    rendered = {id(getattr(module, name)) for module in whole for name in module.__all__}
    missing = [
        name
        for name in lightning_hift.__all__
        if f"lightning_hift.{name}" not in entries and id(getattr(lightning_hift, name)) not in rendered
    ]
    assert missing == []

"""Build hooks of the manual: pages that live elsewhere in the repository, and the docstrings' Sphinx roles.

Pages: the result pages are written by the scripts in ``experiments/`` (tables and plots side by side in
``experiments/results/``); the contributing guide and the changelog sit at the repository root, where people
look for them first. Each is added under the name in ``_PAGES`` with its files next to it, so the relative links
between result pages and to their plots work in both places.

Docstrings: they are written for ``help()`` and name other objects as ``:func:`find_units``` or
``:class:`~lightning_hift.orders.GradNormOrder```; in the reference those show as code (the last part of the path
where the name starts with ``~``). Cross references that the build checks are written in the pages as Markdown
links to a full path, ``[`HiFTStrategy`][lightning_hift.HiFTStrategy]``. Their doctests become code blocks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

_ROOT = Path(__file__).resolve().parents[2]
_PAGES = {
    "experiments/results": "results",  # every .md and .png in it
    "CONTRIBUTING.md": "CONTRIBUTING.md",
    "CHANGELOG.md": "CHANGELOG.md",
}


def on_files(files: Files, config: Any) -> Files:
    for source, target in _PAGES.items():
        path = _ROOT / source
        if path.is_dir():
            for item in sorted(path.iterdir()):
                if item.suffix in (".md", ".png"):
                    files.append(File.generated(config, f"{target}/{item.name}", abs_src_path=str(item)))
        else:
            files.append(File.generated(config, target, abs_src_path=str(path)))
    return files


_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc):`(~?)([^`]+)`")


def _as_code(match: re.Match[str]) -> str:
    shortened, name = match.groups()
    return f"`{name.rsplit('.', 1)[-1] if shortened else name}`"


class _Roles(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        return _fence_doctests([_ROLE.sub(_as_code, line) for line in lines])


def _fence_doctests(lines: list[str]) -> list[str]:
    """Put each doctest (from a ``>>>`` line to the next blank line) in a fenced code block."""
    out: list[str] = []
    indent: str | None = None
    for line in lines:
        if indent is None and line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out += ([""] if out and out[-1].strip() else []) + [f"{indent}```pycon"]
        elif indent is not None and not line.strip():
            out.append(f"{indent}```")
            indent = None
        out.append(line)
    return out + ([f"{indent}```"] if indent is not None else [])


class _RolesExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:
        md.preprocessors.register(_Roles(md), "sphinx_roles", 40)


@event_priority(100)  # before mkdocstrings reads the extensions it renders docstrings with
def on_config(config: Any) -> Any:
    config.markdown_extensions.append(_RolesExtension())
    return config

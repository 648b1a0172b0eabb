"""What the package promises as a package: one version number, and a core that needs no transformers."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest

import lightning_hift

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_has_one_source() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("lightning-hift") == lightning_hift.__version__


def test_the_core_imports_no_transformers() -> None:
    """``pip install lightning-hift`` installs no transformers, so no core module may import it when loaded (the
    demo tasks in ``lightning_hift.tasks`` may: they come with the ``demo`` extra)."""
    offenders = []
    for path in sorted((ROOT / "lightning_hift").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: an import inside a function runs when it is called
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "transformers"]
    assert offenders == []


def test_planning_a_named_model_without_transformers_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(lightning_hift.HiFTConfigError, match=r"lightning-hift\[hf\]"):
        lightning_hift.estimate_memory("llama2-7b")

"""What the package promises as a package: one version number, and a core that needs no transformers."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lightning_hift
from lightning_hift import HiFTConfigError
from lightning_hift.packages import (
    FABRIC_OF,
    PACKAGES,
    PRIVATE_ATTRIBUTES,
    PRIVATE_NAMES,
    lightning_classes,
    private,
    private_attribute,
)

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
    for path in sorted((ROOT / "lightning_hift").rglob("*.py")):
        if "tasks" in path.relative_to(ROOT / "lightning_hift").parts:
            continue
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


def _each_lightning(module: str) -> list[str]:
    """``module`` with ``{pl}`` and ``{fabric}`` filled in for each installed Lightning package."""
    if "{" not in module:
        return [module]
    installed = [name for name in PACKAGES if importlib.util.find_spec(name) is not None]
    return [module.format(pl=name, fabric=FABRIC_OF[name]) for name in installed]


@pytest.mark.parametrize(
    ("module", "attribute"),
    [(module, attribute) for template, attribute, _ in PRIVATE_NAMES for module in _each_lightning(template)],
)
def test_every_private_name_the_package_relies_on_is_there(module: str, attribute: str) -> None:
    private(module, attribute)  # raises HiFTConfigError naming it when it is gone


def _dtensor(tmp_path: Path) -> Any:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    return distribute_tensor(torch.ones(4), init_device_mesh("cpu", (1,)), [Shard(0)])


def _prepared_for_checkpointing() -> Any:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    model = BertModel(config)
    model.enable_input_require_grads()
    return model


PROBES: dict[str, Any] = {
    "{pl}.plugins.precision.HalfPrecision": lambda module, tmp_path: importlib.import_module(
        module.rpartition(".")[0]
    ).HalfPrecision("16-true"),
    "torch.distributed.tensor.DTensor": lambda module, tmp_path: _dtensor(tmp_path),
    "{pl}.strategies.DDPStrategy": lambda module, tmp_path: importlib.import_module(
        module.partition(".strategies")[0]
    ).strategies.DDPStrategy(),
    "{pl}.loops.FitLoop": lambda module, tmp_path: (
        importlib.import_module(module.partition(".loops")[0]).Trainer(logger=False).fit_loop
    ),
    "torch.nn.Module (compiled)": lambda module, tmp_path: torch.compile(torch.nn.Linear(2, 2).forward),
    "transformers.PreTrainedModel": lambda module, tmp_path: _prepared_for_checkpointing(),
}
"""How to make an instance of each owner in PRIVATE_ATTRIBUTES (a new entry there needs one here)."""


@pytest.mark.parametrize(("owner", "attribute"), [(owner, attribute) for owner, attribute, _ in PRIVATE_ATTRIBUTES])
def test_every_private_attribute_the_package_reads_is_on_its_instances(
    owner: str, attribute: str, tmp_path: Path
) -> None:
    try:
        for module in _each_lightning(owner):
            instance = PROBES[owner](module, tmp_path)
            if attribute == "_require_grads_hook":  # transformers 5 keeps a list beside it
                assert hasattr(instance, attribute) or hasattr(instance, "_require_grads_hooks")
            else:
                assert private_attribute(instance, attribute) is not None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_a_private_name_an_upgrade_removed_is_named_with_the_installed_version() -> None:
    version = re.escape(importlib.metadata.version("torch"))
    with pytest.raises(HiFTConfigError, match=rf"torch\.nn\.Module\._gone, which the installed torch {version} "):
        private("torch.nn", "Module._gone")
    with pytest.raises(
        HiFTConfigError, match=r"relies on torch\.nn\.modules\.linear\.Linear\._gone, which the installed"
    ):
        private_attribute(torch.nn.Linear(1, 1), "_gone")
    with pytest.raises(HiFTConfigError, match=r"relies on lightning\.pytorch\.plugins\.precision\.Gone"):
        lightning_classes("plugins.precision.Gone")


def test_a_renamed_lightning_class_stops_the_fit_instead_of_training_without_masters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HiFT recognises bf16-true by the class of the precision plugin; when the class was looked up by a name that is
    gone, the lookup found nothing and the run trained half-precision weights without fp32 masters, without a word."""
    from tests.helpers.modules import TinyModule, fit

    monkeypatch.delattr(importlib.import_module("lightning.pytorch.plugins.precision"), "HalfPrecision")
    with pytest.raises(HiFTConfigError, match=r"lightning\.pytorch\.plugins\.precision\.HalfPrecision"):
        fit(TinyModule(), lightning_hift.HiFTStrategy(), 1, precision="bf16-true")

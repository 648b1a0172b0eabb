"""The HiFT settings object, the strategies' documented arguments, the units found once per fit, and the fp32 masters
saved by the strategy (checkpoints that kept them in HiFT's callback state still resume)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import lightning_hift.units
from lightning_hift.errors import HiFTConfigError
from lightning_hift.masters import MASTERS_KEY
from lightning_hift.settings import ARGS, HiFTSettings
from tests.helpers.lightning import HiFTStrategy, ModelCheckpoint, seed_everything
from tests.helpers.modules import ResumableTinyModule, quiet_trainer

BOUND = ("HiFTStrategy", "HiFTDDPStrategy", "HiFTFSDPStrategy", "HiFTCallback")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layers_per_block": 0}, "layers_per_block must be a whole number >= 1 or 'auto'"),
        ({"switch_every": True}, "switch_every must be a whole number"),
        ({"order": "sideways"}, "Unknown order='sideways'"),
        ({"optimizer_state": "disk"}, "Unknown optimizer_state='disk'"),
        ({"lr_update": "epoch"}, "Unknown lr_update='epoch'"),
        ({"on_nonfinite": "ignore"}, "Unknown on_nonfinite='ignore'"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"lr_scale": 0}, "lr_scale must be 'blocks'"),
        ({"memory_budget": "lots"}, "memory_budget must be a number of bytes"),
        ({"frozen": "*.bias"}, "is a single string"),
        ({"layers": 3}, "layers= must be"),
    ],
)
def test_the_settings_refuse_a_wrong_argument_when_made_and_when_changed(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(HiFTConfigError, match=re.escape(message)):
        HiFTSettings(**changes)
    with pytest.raises(HiFTConfigError, match=re.escape(message)):
        HiFTSettings().replace(**changes)
    strategy = HiFTStrategy()
    (name, value), *_ = changes.items()
    with pytest.raises(HiFTConfigError, match=re.escape(message)):  # an attribute of the strategy is checked too
        setattr(strategy, "optimizer_state_mode" if name == "optimizer_state" else name, value)


def test_the_strategy_reads_its_settings_as_attributes_and_a_checkpoint_records_the_same_values() -> None:
    strategy = HiFTStrategy(layers_per_block=2, optimizer_state="keep", frozen=["*.bias"], memory_budget="1KiB")
    assert (strategy.layers_per_block, strategy.optimizer_state_mode) == (2, "keep")
    assert (strategy.frozen, strategy.memory_budget) == (("*.bias",), 1024)
    strategy.seed = 7
    assert strategy.settings.seed == 7 and strategy.settings.layers_per_block == 2
    assert strategy.settings.recorded() == {"optimizer_state": "keep", "layers_per_block": 2}


@pytest.mark.parametrize("package", ["lightning_hift.pytorch", "lightning_hift.pytorch_lightning"])
@pytest.mark.parametrize("name", BOUND)
def test_every_bound_class_documents_each_of_its_own_arguments(package: str, name: str) -> None:
    module = pytest.importorskip(package)
    cls = getattr(module, name)
    doc = inspect.cleandoc(cls.__doc__ or "")
    assert "HiFTStrategyBase" not in doc  # its own arguments, not a pointer elsewhere
    documented = re.findall(r"^    (\w+): ", doc.split("Args:\n", 1)[1], flags=re.MULTILINE)
    parameters = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert documented == parameters
    if name != "HiFTCallback":
        assert parameters[: len(ARGS)] == list(ARGS)  # the HiFT arguments, documented once, first in each


def test_the_units_are_found_once_per_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    # layers_per_block="auto": the planner cuts every block size, then the fit cuts its blocks.
    calls: list[str] = []
    find_hf_model = lightning_hift.units._find_hf_model

    def counted(model: torch.nn.Module) -> Any:
        calls.append(type(model).__name__)
        return find_hf_model(model)

    monkeypatch.setattr(lightning_hift.units, "_find_hf_model", counted)
    trainer = quiet_trainer(strategy=HiFTStrategy(layers_per_block="auto", memory_budget="1GiB"), max_steps=2)
    trainer.fit(ResumableTinyModule())
    assert calls == ["ResumableTinyModule"]


def _train(folder: Path, ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
    seed_everything(3)
    checkpoint = ModelCheckpoint(dirpath=folder, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(
        strategy=HiFTStrategy(),
        precision="bf16-true",
        max_steps=8,
        callbacks=[checkpoint],
        enable_checkpointing=True,
    )
    module = ResumableTinyModule(lr=1e-3)
    trainer.fit(module, ckpt_path=ckpt_path)
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_the_strategy_saves_the_masters_and_a_checkpoint_with_them_in_the_callback_state_resumes_bit_for_bit(
    tmp_path: Path,
) -> None:
    full = _train(tmp_path / "full")
    ckpt = tmp_path / "full" / "step=4.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    masters = checkpoint.pop(MASTERS_KEY)
    assert len(masters["masters"]) == len(full) and all(m.dtype == torch.float32 for m in masters["masters"])
    (hift,) = [state for key, state in checkpoint["callbacks"].items() if "HiFTCallback" in key]
    assert "masters" not in hift
    hift["masters"] = masters  # where checkpoints written before kept them
    torch.save(checkpoint, tmp_path / "old.ckpt")
    for path in (ckpt, tmp_path / "old.ckpt"):
        resumed = _train(tmp_path / path.stem, ckpt_path=path)
        assert all(torch.equal(value, resumed[name]) for name, value in full.items()), path.name

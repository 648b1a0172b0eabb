"""HiFT without code edits: a user's Hydra app or LightningCLI script that never imports lightning_hift trains with
HiFT when its configuration names the strategy class by import path (Hydra and jsonargparse import it from there).

Each app is written into tmp_path and run in its own process: this process has imported lightning_hift, whose import
registers "hift", so only a fresh interpreter shows that the route works without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REPORT = "HIFT-REPORT "

# The Lightning package of the user's app, the class path its configuration names, and where that class is defined.
ROUTES = [
    pytest.param(
        "lightning.pytorch", "lightning_hift.HiFTStrategy", "lightning_hift.pytorch.HiFTStrategy", id="lightning"
    ),
    pytest.param(
        "pytorch_lightning",
        "lightning_hift.pytorch_lightning.HiFTStrategy",
        "lightning_hift.pytorch_lightning.HiFTStrategy",
        id="pytorch_lightning",
    ),
]

# Shared by the apps: four Linear layers make four units, so layers_per_block=2 cuts two blocks (the default, four).
TINY_MODULE = """
import json

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from PACKAGE import LightningModule


class TinyModel(LightningModule):
    def __init__(self, width: int = 8, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(4))
        self.trained_blocks = []

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x

    def training_step(self, batch, batch_idx):
        self.trained_blocks.append(getattr(self.trainer.strategy, "active_block", None))
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        inputs = torch.randn(32, self.hparams.width, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(inputs), batch_size=8)


def report(trainer, imported_by_app):
    strategy = trainer.strategy
    print("MARKER" + json.dumps({
        "imported_by_app": imported_by_app,
        "trainer": type(trainer).__module__,
        "strategy": f"{type(strategy).__module__}.{type(strategy).__qualname__}",
        "layers_per_block": getattr(strategy, "layers_per_block", None),
        "order": getattr(strategy, "order", None),
        "blocks": len(getattr(strategy, "blocks", ())),
        "trained_blocks": trainer.lightning_module.trained_blocks,
    }))
"""

HYDRA_APP = """
import sys

import hydra
from hydra.utils import instantiate
from tiny import report

IMPORTED_BY_APP = "lightning_hift" in sys.modules


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    trainer = instantiate(cfg.trainer)
    trainer.fit(instantiate(cfg.model))
    report(trainer, IMPORTED_BY_APP)


if __name__ == "__main__":
    main()
"""

HYDRA_CONFIG = """
trainer:
  _target_: PACKAGE.Trainer
  max_steps: 4
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  _target_: tiny.TinyModel
"""

CLI_APP = """
import sys

from PACKAGE.cli import LightningCLI
from tiny import TinyModel, report

IMPORTED_BY_APP = "lightning_hift" in sys.modules


class App(LightningCLI):
    def after_fit(self):
        report(self.trainer, IMPORTED_BY_APP)


if __name__ == "__main__":
    App(
        TinyModel,
        trainer_defaults={
            "max_steps": 4,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    )
"""

# What --print_config shows of HiFT's own arguments, given layers_per_block=2 and order=top2down.
HIFT_INIT_ARGS = {
    "layers_per_block": 2,
    "order": "top2down",
    "seed": 0,
    "switch_every": 1,
    "optimizer_state": "offload",
    "lr_update": "cycle",
    "layers": None,
    "frozen": [],
    "on_nonfinite": "skip",
}


def write_app(folder: Path, package: str, files: dict[str, str]) -> None:
    for name, text in {"tiny.py": TINY_MODULE.replace("MARKER", REPORT), **files}.items():
        (folder / name).write_text(text.replace("PACKAGE", package))


def run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a Python script in ``folder``, with this checkout's lightning_hift importable (but not imported)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in result.stdout.splitlines() if line.startswith(REPORT)]
    assert len(lines) == 1, f"no report from the app:\n{result.stdout[-2000:]}"
    return json.loads(lines[0].removeprefix(REPORT))


def assert_trained_with_hift(report: dict[str, Any], package: str, defined_in: str, order: str) -> None:
    """Two blocks of two layers, switched in ``order`` at every step, by the app's own Trainer."""
    assert report["imported_by_app"] is False
    assert report["trainer"].startswith(f"{package}.")
    assert report["strategy"] == defined_in
    assert (report["layers_per_block"], report["blocks"], report["order"]) == (2, 2, order)
    assert report["trained_blocks"] == ([0, 1, 0, 1] if order == "bottom2up" else [1, 0, 1, 0])


def cli_strategy(class_path: str) -> list[str]:
    return [
        f"--trainer.strategy.class_path={class_path}",
        "--trainer.strategy.init_args.layers_per_block=2",
        "--trainer.strategy.init_args.order=top2down",
    ]


def assert_shows_hift(config: str, class_path: str) -> None:
    strategy = yaml.safe_load(config)["trainer"]["strategy"]
    assert strategy["class_path"] == class_path
    assert {name: strategy["init_args"][name] for name in HIFT_INIT_ARGS} == HIFT_INIT_ARGS


@pytest.mark.slow
@pytest.mark.parametrize(("package", "class_path", "defined_in"), ROUTES)
def test_hydra_app_trains_with_hift_from_a_target_override(
    tmp_path: Path, package: str, class_path: str, defined_in: str
) -> None:
    write_app(tmp_path, package, {"app.py": HYDRA_APP, "config.yaml": HYDRA_CONFIG})
    overrides = [f"+trainer.strategy._target_={class_path}", "+trainer.strategy.layers_per_block=2"]
    result = run(tmp_path, "app.py", f"hydra.run.dir={tmp_path / 'run'}", *overrides)
    assert_trained_with_hift(report_of(result), package, defined_in, order="bottom2up")


@pytest.mark.slow
@pytest.mark.parametrize(("package", "class_path", "defined_in"), ROUTES)
def test_lightning_cli_trains_with_hift_from_a_class_path(
    tmp_path: Path, package: str, class_path: str, defined_in: str
) -> None:
    write_app(tmp_path, package, {"cli.py": CLI_APP})
    result = run(tmp_path, "cli.py", "fit", *cli_strategy(class_path))
    assert_trained_with_hift(report_of(result), package, defined_in, order="top2down")
    # The configuration LightningCLI saves with the run (into the working folder, as there is no logger).
    assert_shows_hift((tmp_path / "config.yaml").read_text(), class_path)
    # layers_per_block="auto" and a budget string from the command line: all four layers fit in one block.
    (tmp_path / "auto").mkdir()
    write_app(tmp_path / "auto", package, {"cli.py": CLI_APP})
    init_args = "--trainer.strategy.init_args"
    auto = [f"{init_args}.layers_per_block=auto", f"{init_args}.memory_budget=1GiB"]
    report = report_of(run(tmp_path / "auto", "cli.py", "fit", f"--trainer.strategy.class_path={class_path}", *auto))
    assert (report["strategy"], report["layers_per_block"], report["blocks"]) == (defined_in, 4, 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("package", "class_path", "defined_in"),
    [
        *ROUTES,
        pytest.param(
            "lightning.pytorch", "lightning_hift.HiFTDDPStrategy", "lightning_hift.pytorch.HiFTDDPStrategy", id="ddp"
        ),
    ],
)
def test_lightning_cli_prints_the_hift_arguments_and_trains_from_the_printed_config(
    tmp_path: Path, package: str, class_path: str, defined_in: str
) -> None:
    write_app(tmp_path, package, {"cli.py": CLI_APP})
    printed = run(tmp_path, "cli.py", "fit", *cli_strategy(class_path), "--print_config").stdout
    assert_shows_hift(printed, class_path)
    # A configuration file is the other no-edit route: the printed one, given back, trains the same way.
    (tmp_path / "hift.yaml").write_text(printed)
    result = run(tmp_path, "cli.py", "fit", "--config=hift.yaml")
    assert_trained_with_hift(report_of(result), package, defined_in, order="top2down")

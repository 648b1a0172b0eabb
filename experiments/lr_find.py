"""Lightning's learning-rate range test, under HiFT and under full fine-tuning, on a task from conf/.

    python experiments/lr_find.py                      # MiniLM on tweets (the default task), about 3 min on 2 CPU cores
    python experiments/lr_find.py --overrides task=bbc

``Tuner.lr_find`` under ``strategy="hift"`` trains block by block as the fit will, so its suggestion is one for
HiFT, not for full fine-tuning. Prints a table and writes ``experiments/results/lr_find.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.tuner import Tuner
from run_summary import markdown
from train import build_module

import lightning_hift  # noqa: F401  (registers strategy="hift")

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"HiFT (strategy='hift', defaults)": "hift", "full fine-tuning (strategy='auto')": "auto"}


def suggest(overrides: list[str], strategy: str, num_training: int) -> float | None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    seed_everything(cfg.seed, workers=True)
    data = instantiate(cfg.task.data)
    module = build_module(cfg.task.module, data)
    trainer = Trainer(
        accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False, max_steps=1000
    )
    finder = Tuner(trainer).lr_find(
        module, datamodule=data, min_lr=1e-6, max_lr=1e-1, num_training=num_training, update_attr=False
    )
    return finder.suggestion() if finder is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for conf/train.yaml")
    parser.add_argument("--num-training", type=int, default=100, help="steps of the range test")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "lr_find.md")
    args = parser.parse_args()
    rows = []
    for name, strategy in METHODS.items():
        lr = suggest(args.overrides, strategy, args.num_training)
        rows.append((name, "none" if lr is None else f"{lr:.2e}"))
    task = " ".join(args.overrides) or "defaults (MiniLM, tweets, AdamW, batch 16)"
    lines = [
        f"# lr_find suggestions: {task}, {args.num_training} range-test steps from 1e-6 to 1e-1",
        "",
        markdown(pd.DataFrame(rows, columns=["method", "suggested learning rate"])),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

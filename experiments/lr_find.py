"""Lightning's learning-rate range test, under HiFT and under full fine-tuning, on a task from conf/.

    python experiments/lr_find.py                      # MiniLM on tweets (the default task), about 3 min on 2 CPU cores
    python experiments/lr_find.py --overrides task=bbc

``Tuner.lr_find`` under ``strategy="hift"`` trains block by block as the fit will, so its suggestion is one for
HiFT, not for full fine-tuning. Prints a table and writes ``experiments/results/lr_find.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
from lightning.pytorch.tuner import Tuner
from run_summary import RESULTS, arguments, markdown, quiet_trainer, write_page
from train import compose_task

import lightning_hift  # noqa: F401  (registers strategy="hift")

METHODS = {"HiFT (strategy='hift', defaults)": "hift", "full fine-tuning (strategy='auto')": "auto"}


def suggest(overrides: list[str], strategy: str, num_training: int) -> float | None:
    _, data, module = compose_task(overrides)
    trainer = quiet_trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=1000, enable_progress_bar=True)
    finder = Tuner(trainer).lr_find(
        module, datamodule=data, min_lr=1e-6, max_lr=1e-1, num_training=num_training, update_attr=False
    )
    return finder.suggestion() if finder is not None else None


def main() -> None:
    parser = arguments(__doc__, RESULTS / "lr_find.md")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for conf/train.yaml")
    parser.add_argument("--num-training", type=int, default=100, help="steps of the range test")
    args = parser.parse_args()
    rows = []
    for name, strategy in METHODS.items():
        lr = suggest(args.overrides, strategy, args.num_training)
        rows.append((name, "none" if lr is None else f"{lr:.2e}"))
    task = " ".join(args.overrides) or "defaults (MiniLM, tweets, AdamW, batch 16)"
    table = markdown(pd.DataFrame(rows, columns=["method", "suggested learning rate"]))
    write_page(
        args.out, f"# lr_find suggestions: {task}, {args.num_training} range-test steps from 1e-6 to 1e-1\n\n{table}\n"
    )


if __name__ == "__main__":
    main()

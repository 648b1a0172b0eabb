"""What learning rate does HiFT need when a user brings a full fine-tuning recipe? Measures ``lr_scale``.

    python experiments/lr_scale.py                  # all three below: about 25 min on 2 idle CPU cores
    python experiments/lr_scale.py --only glue      # only the GLUE-style module (about 3 min)

Three LightningModules, each trained at its own full fine-tuning rate, under Lightning's default strategy and under
HiFT with ``lr_scale`` = 1 (the recipe's rate as it is), sqrt(k), k (``"blocks"``, the default) and 2k, where k is
the number of blocks:

- **GLUE-style**: a module written the way Lightning's GLUE fine-tuning tutorial writes one (AdamW with eps 1e-8 and
  no weight decay on biases and LayerNorm, a linear schedule without warm-up over ``estimated_stepping_batches``,
  lr 2e-5, batch 32), here on MiniLM and the balanced tweets, for a short budget of 60 steps.
- **MiniLM**: the package's own task module and data from ``conf/`` (full fine-tuning's tuned rate 5e-5, warm-up
  10%, batch 16), for 240 steps.
- **SmolLM2**: ``experiment=smollm2_lm`` from ``conf/`` (causal LM on the tweet text, 32 blocks; full fine-tuning's
  rate 3e-5), for 64 steps: many blocks, so a large k.

Scores on the validation split (the test split is left alone). Prints a table and writes
``experiments/results/lr_scale.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from run_summary import markdown
from torch import Tensor
from train import build_module
from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

from lightning_hift import HiFTStrategy, partition
from lightning_hift.tasks import TweetSentimentDataModule
from lightning_hift.tasks.models import resolve_model

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "results" / "lr_scale.md"


class GLUEStyleClassifier(LightningModule):
    """A sequence classifier written as Lightning's GLUE tutorial writes one: the user's module, not the package's."""

    def __init__(
        self,
        model_name_or_path: str,
        num_labels: int,
        learning_rate: float = 2e-5,
        adam_epsilon: float = 1e-8,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, num_labels=num_labels)

    def forward(self, **inputs: Tensor) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(**batch).loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        outputs = self(**batch)
        accuracy = (outputs.logits.argmax(-1) == batch["labels"]).float().mean()
        self.log_dict({"val/loss": outputs.loss, "val/acc": accuracy}, batch_size=len(batch["labels"]))

    def configure_optimizers(self) -> Any:
        no_decay = ("bias", "LayerNorm.weight")
        named = list(self.model.named_parameters())
        groups = [
            {
                "params": [p for n, p in named if not any(nd in n for nd in no_decay)],
                "weight_decay": self.hparams["weight_decay"],
            },
            {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams["learning_rate"], eps=self.hparams["adam_epsilon"])
        scheduler = get_linear_schedule_with_warmup(
            optimizer, self.hparams["warmup_steps"], self.trainer.estimated_stepping_batches
        )
        return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]


@dataclass(frozen=True)
class Setting:
    """One module and budget: how to build its data and module, and its full fine-tuning recipe."""

    name: str
    steps: int
    recipe_lr: float

    def build(self, seed: int) -> tuple[LightningDataModule, LightningModule]:
        if self.name == "glue":
            data = TweetSentimentDataModule(tokenizer="minilm", batch_size=32, eval_batch_size=64, seed=seed)
            module = GLUEStyleClassifier(str(resolve_model("minilm")), num_labels=2, learning_rate=self.recipe_lr)
            return data, module
        experiment = ["experiment=smollm2_lm"] if self.name == "smollm2" else []
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[*experiment, "hift=fpft", f"lr={self.recipe_lr}", f"seed={seed}"])
        data = instantiate(cfg.task.data)
        return data, build_module(cfg.task.module, data)


SETTINGS = {
    "glue": Setting("glue", steps=60, recipe_lr=2e-5),
    "minilm": Setting("minilm", steps=240, recipe_lr=5e-5),
    "smollm2": Setting("smollm2", steps=64, recipe_lr=3e-5),
}


def run(setting: Setting, scale: float | None, seed: int) -> dict[str, float]:
    """Fit at the recipe's rate (``scale`` None: full fine-tuning) and score the validation split."""
    seed_everything(seed, workers=True)
    data, module = setting.build(seed)
    strategy: Any = "auto" if scale is None else HiFTStrategy(lr_scale=scale, seed=seed)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=setting.steps,
        val_check_interval=setting.steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    metrics = trainer.callback_metrics
    loss = float(metrics["val/loss"]) if "val/loss" in metrics else math.nan  # the classifier logs no loss
    score = float(metrics["val/acc"]) if "val/acc" in metrics else float(metrics["val/ppl"])
    return {"loss": loss, "score": score, "seconds": seconds}


def blocks_of(setting: Setting) -> int:
    _, module = setting.build(0)
    return len(partition(module, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SETTINGS), nargs="+", default=sorted(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    rows = []
    for name in args.only:
        setting = SETTINGS[name]
        k = blocks_of(setting)
        scales = {"1": 1.0, "sqrt(k)": math.sqrt(k), f"k ('blocks', {k})": float(k), "2k": 2.0 * k}
        for method, scale in {
            "full fine-tuning": None,
            **{f"HiFT, lr_scale={s}": v for s, v in scales.items()},
        }.items():
            result = run(setting, scale, args.seed)
            rows.append(
                {
                    "module": name,
                    "steps": setting.steps,
                    "recipe lr": f"{setting.recipe_lr:.0e}",
                    "method": method,
                    "lr_scale": "" if scale is None else f"{scale:.2f}",
                    "effective lr": f"{setting.recipe_lr * (scale or 1.0):.2e}",
                    "val loss": "n/a" if math.isnan(result["loss"]) else f"{result['loss']:.3f}",
                    "val acc / ppl": f"{result['score']:.3f}",
                    "fit seconds": f"{result['seconds']:.0f}",
                }
            )
            print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# HiFT at a full fine-tuning recipe's learning rate: the effect of `lr_scale`\n\n"
        "Written by `python experiments/lr_scale.py` (see its docstring for the three modules). Validation split,"
        f" seed {args.seed}; k is the number of blocks (one unit per block, bottom-up, the package defaults).\n\n"
        + markdown(pd.DataFrame(rows))
        + "\n"
    )


if __name__ == "__main__":
    main()

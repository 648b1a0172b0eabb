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

Scores on the validation split (the test split is left alone); the table goes to experiments/results/lr_scale.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging
import math
import warnings
from typing import Any

import pandas as pd
import torch
from lightning.pytorch import LightningDataModule, LightningModule, seed_everything
from run_summary import RESULTS, arguments, markdown, timed_fit, write_page
from torch import Tensor
from train import compose_task
from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

from lightning_hift import HiFTStrategy, partition
from lightning_hift.tasks import TweetSentimentDataModule
from lightning_hift.tasks.models import resolve_model

SETTINGS = {"glue": (60, 2e-5), "minilm": (240, 5e-5), "smollm2": (64, 3e-5)}
"""Each module's steps and its full fine-tuning recipe's rate."""


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
        no_decay, hp = ("bias", "LayerNorm.weight"), self.hparams
        decayed = [p for n, p in self.model.named_parameters() if not any(nd in n for nd in no_decay)]
        rest = [p for n, p in self.model.named_parameters() if any(nd in n for nd in no_decay)]
        groups = [{"params": decayed, "weight_decay": hp.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, eps=hp.adam_epsilon)
        steps = self.trainer.estimated_stepping_batches
        scheduler = get_linear_schedule_with_warmup(optimizer, hp.warmup_steps, steps)
        return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]


def build(name: str, seed: int) -> tuple[LightningDataModule, LightningModule]:
    """The data and module of one setting, made after seeding by ``seed``."""
    recipe_lr = SETTINGS[name][1]
    if name == "glue":
        data = TweetSentimentDataModule(tokenizer="minilm", batch_size=32, eval_batch_size=64, seed=seed)
        return data, GLUEStyleClassifier(str(resolve_model("minilm")), num_labels=2, learning_rate=recipe_lr)
    experiment = ["experiment=smollm2_lm"] if name == "smollm2" else []
    _, data, module = compose_task([*experiment, "hift=fpft", f"lr={recipe_lr}", f"seed={seed}"])
    return data, module


def run(name: str, scale: float | None, seed: int) -> dict[str, float]:
    """Fit at the recipe's rate (``scale`` None: full fine-tuning) and score the validation split."""
    seed_everything(seed, workers=True)
    data, module = build(name, seed)
    steps = SETTINGS[name][0]
    strategy: Any = "auto" if scale is None else HiFTStrategy(lr_scale=scale, seed=seed)
    schedule = {"max_steps": steps, "val_check_interval": steps, "check_val_every_n_epoch": None}
    trainer, _, seconds = timed_fit(
        module, data, accelerator="cpu", devices=1, strategy=strategy, num_sanity_val_steps=0, **schedule
    )
    metrics = trainer.callback_metrics
    loss = float(metrics["val/loss"]) if "val/loss" in metrics else math.nan  # the classifier logs no loss
    score = float(metrics["val/acc"]) if "val/acc" in metrics else float(metrics["val/ppl"])
    return {"loss": loss, "score": score, "seconds": seconds}


def main() -> None:
    parser = arguments(__doc__, RESULTS / "lr_scale.md")
    parser.add_argument("--only", choices=sorted(SETTINGS), nargs="+", default=sorted(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    rows = []
    for name in args.only:
        (steps, recipe_lr), k = SETTINGS[name], len(partition(build(name, 0)[1], 1))
        scales = {"1": 1.0, "sqrt(k)": math.sqrt(k), f"k ('blocks', {k})": float(k), "2k": 2.0 * k}
        methods = {"full fine-tuning": None, **{f"HiFT, lr_scale={s}": v for s, v in scales.items()}}
        for method, scale in methods.items():
            result = run(name, scale, args.seed)
            rows.append(
                {
                    "module": name,
                    "steps": steps,
                    "recipe lr": f"{recipe_lr:.0e}",
                    "method": method,
                    "lr_scale": "" if scale is None else f"{scale:.2f}",
                    "effective lr": f"{recipe_lr * (scale or 1.0):.2e}",
                    "val loss": "n/a" if math.isnan(result["loss"]) else f"{result['loss']:.3f}",
                    "val acc / ppl": f"{result['score']:.3f}",
                    "fit seconds": f"{result['seconds']:.0f}",
                }
            )
            print(rows[-1], flush=True)
    page = (
        "# HiFT at a full fine-tuning recipe's learning rate: the effect of `lr_scale`\n\n"
        "Written by `python experiments/lr_scale.py` (see its docstring for the three modules). Validation split,"
        f" seed {args.seed}; k is the number of blocks (one unit per block, bottom-up, the package defaults).\n\n"
    )
    write_page(args.out, page + markdown(pd.DataFrame(rows)) + "\n")


if __name__ == "__main__":
    main()

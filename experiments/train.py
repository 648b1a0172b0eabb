"""Train with Hydra: fine-tune a pretrained model on a task, block-wise (HiFT) or in full, from conf/.

    python experiments/train.py                              # MiniLM on tweets, HiFT, CPU (a few minutes)
    python experiments/train.py hift=fpft                    # the same run as plain full fine-tuning
    python experiments/train.py hift=top2down hift.strategy.layers_per_block=2 optimizer=sgd lr=1e-2
    python experiments/train.py experiment=smollm2_lm trainer=gpu
    python experiments/train.py sweep=hift_grid              # multirun: order x layers per block x optimizer
    python experiments/train.py --cfg job                    # print the composed config and stop

Each run writes its folder (outputs/ or multirun/): the composed config in .hydra/, the log, the logger's files
and metrics.json (test metrics, median seconds per optimizer step, steps, peak memory).
"""

from __future__ import annotations

import os

# Set before transformers is imported: it reads the switch once, and the offline models must never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
import transformers
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from run_summary import describe_strategy, format_summary, peak_memory, write_metrics
from transformers import PreTrainedModel

import lightning_hift  # noqa: F401  (registers strategy="hift" and the other names)
from lightning_hift.tasks import StepTimer
from lightning_hift.tasks.models import load_tokenizer

log = logging.getLogger(__name__)


class _DropAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet() -> None:
    """Keep the console to what a run's user needs: drop the transformers load report (a fresh head is expected
    here), Lightning's advertising tip, and a deprecation notice Lightning raises about its own torch calls."""
    transformers.logging.set_verbosity_error()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvert())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def progress_bars(cfg: DictConfig) -> list[Callback]:
    """Lightning's Rich bar, but naming the epoch alone when ``max_steps`` bounds the run: Lightning then sets
    ``max_epochs=-1`` and its bar reads "Epoch 2/-2"."""
    if not cfg.trainer.get("enable_progress_bar", True) or importlib.util.find_spec("rich") is None:
        return []
    from lightning.pytorch.callbacks import RichProgressBar

    class StepBoundedRichBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            description: str = super()._get_train_description(current_epoch)
            if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
                description = description.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
            return description

    return [StepBoundedRichBar()]


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train and test as ``cfg`` says; return the metric a sweep optimises (``cfg.metric``)."""
    quiet()
    metrics = train(cfg)
    # Hydra's logging prints this and keeps it in the run folder's train.log.
    log.info("Run folder %s\n%s", cfg.output_dir, format_summary(metrics, cfg.metric))
    return metrics.get(cfg.metric)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test, and write ``metrics.json`` into ``cfg.output_dir``; return what it holds."""
    seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_initialized():  # by an earlier job of this multirun
        torch.cuda.reset_peak_memory_stats()
    data: LightningDataModule = instantiate(cfg.task.data)
    module = build_module(cfg.task.module, data)
    timer = StepTimer()
    callbacks = [timer, *progress_bars(cfg), *build_callbacks(cfg.get("callbacks"))]
    trainer: Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=instantiate(cfg.logger) if cfg.get("logger") else False,
        # Lightning would add a ModelCheckpoint of its own; checkpoints are saved only when one is configured.
        enable_checkpointing=any(isinstance(callback, ModelCheckpoint) for callback in callbacks),
    )
    if cfg.fit:
        trainer.fit(module, datamodule=data)
    results: dict[str, Any] = {}
    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.test(module, datamodule=data, ckpt_path=best or None)[0]
    metrics = {
        **results,
        "metric": cfg.metric,
        "seconds_per_step": timer.median_seconds if timer.seconds else None,
        "steps": trainer.global_step,
        "strategy": describe_strategy(trainer.strategy),
        **peak_memory(trainer.strategy.root_device),
    }
    # Sharded weights (hift=fsdp) are gathered by every process; one process writes.
    weights = whole_weights(module) if cfg.export else None
    if trainer.is_global_zero:  # one writer when several processes train (hift=ddp, hift=fsdp)
        write_metrics(Path(cfg.output_dir) / "metrics.json", metrics)
        if cfg.export:
            export(module, cfg.model.name_or_path, Path(cfg.output_dir) / "model", weights)
    return metrics


def whole_weights(module: LightningModule) -> dict[str, torch.Tensor] | None:
    """The wrapped model's weights gathered whole when FSDP2 shards them (every process must call this), else None:
    ``save_pretrained`` reads them from the model itself."""
    model = getattr(module, "model", None)
    if model is None or not any(hasattr(p, "device_mesh") for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export(
    module: LightningModule, tokenizer_name: str, folder: Path, weights: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the wrapped transformers model (with ``weights`` instead of its own, if given) and its tokenizer with
    ``save_pretrained``."""
    model = getattr(module, "model", None)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"export=true needs a module with a transformers `model`; {type(module).__name__} has none.")
    model.save_pretrained(folder, state_dict=weights)
    load_tokenizer(tokenizer_name).save_pretrained(folder)
    log.info("Exported the model to %s", folder)


def compose_task(overrides: list[str]) -> tuple[DictConfig, LightningDataModule, LightningModule]:
    """conf/train.yaml composed with ``overrides``, and its task's data and module, made after seeding by its seed."""
    with hydra.initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = hydra.compose("train", overrides=overrides)
    seed_everything(cfg.seed, workers=True)
    data = instantiate(cfg.task.data)
    return cfg, data, build_module(cfg.task.module, data)


def build_module(cfg: DictConfig, data: LightningDataModule) -> LightningModule:
    """Instantiate the task's module; a classifier's head size (``num_labels: ???``) comes from the data."""
    if OmegaConf.is_missing(cfg, "num_labels"):
        return instantiate(cfg, num_labels=data.num_classes)  # type: ignore[attr-defined]
    return instantiate(cfg)


def build_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """One callback per node of the callbacks group (e.g. ``callbacks=checkpoint``); none by default."""
    return [instantiate(node) for node in (cfg or {}).values()]


if __name__ == "__main__":
    main()

"""What the experiments share: a quiet Trainer and a timed fit, peak memory, the results pages' tables, and what a
training run reports (a metrics.json in the run folder, a small summary table)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import Strategy

from lightning_hift import HiFTStrategyBase
from lightning_hift.tasks import StepTimer

RESULTS = Path(__file__).resolve().with_name("results")


def quiet_trainer(**settings: Any) -> Trainer:
    """A Trainer that writes nothing of its own (no logger, checkpoints, progress bar or model summary)."""
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    return Trainer(**{**quiet, "enable_model_summary": False, **settings})


def timed_fit(module: Any, *data: Any, callbacks: Any = (), **settings: Any) -> tuple[Trainer, StepTimer, float]:
    """Fit with a StepTimer last among the callbacks (a step's time includes theirs); returns the wall seconds too."""
    timer = StepTimer()
    trainer = quiet_trainer(callbacks=[*callbacks, timer], **settings)
    started = time.perf_counter()
    trainer.fit(module, *data)
    return trainer, timer, time.perf_counter() - started


def arguments(doc: str, out: Path) -> argparse.ArgumentParser:
    """A script's parser: its docstring as the help text, and ``--out``, where its page goes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=out)
    return parser


def write_page(path: Path, page: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    print(page)


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak bytes: the whole process's resident set, and CUDA tensors when ``device`` is a GPU."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
    if device.type == "cuda":
        peak["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def describe_strategy(strategy: Strategy) -> str:
    """``hift bottom2up m=1 lr x8`` for HiFT (updates at 8 times the rate), the class name for any other strategy."""
    if isinstance(strategy, HiFTStrategyBase):
        name = f"hift {strategy.order} m={strategy.layers_per_block}"
        return f"{name} lr x{strategy.lr_factor():g}" if strategy.blocks else name  # blocks: cut when a fit starts
    return type(strategy).__name__


def write_metrics(path: Path, metrics: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def format_summary(metrics: Mapping[str, Any], metric: str) -> str:
    rows = {
        metric: _number(metrics.get(metric)),
        "seconds / step": _number(metrics.get("seconds_per_step")),
        "peak memory": " / ".join(
            f"{_gib(metrics[key])} {label}"
            for key, label in (("peak_rss_bytes", "RSS"), ("peak_cuda_bytes", "CUDA"))
            if key in metrics
        ),
        "strategy": str(metrics.get("strategy")),
        "steps": str(metrics.get("steps")),
    }
    width = max(len(name) for name in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows.items())


def markdown(frame: pd.DataFrame) -> str:
    """``frame`` as a Markdown table, its cells unpadded and as they are (a rate stays ``5e-5``)."""
    return str(frame.to_markdown(index=False, stralign=None, numalign=None, disable_numparse=True))


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"

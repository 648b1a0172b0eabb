"""Benchmark HiFT against full fine-tuning and its peers, every run in its own process (protocol: bench_protocol.md).

    python experiments/benchmark.py suite=tweets methods=[full,hift,lora]   # no suite=: all three, several hours
    python experiments/benchmark.py report_only=true     # rebuild the tables and plots from the saved records

Settings: conf/benchmark.yaml through Hydra. A run whose record exists with the same settings is not run again, so an
interrupted benchmark continues where it stopped (``fresh=true`` starts over); a peer that cannot run is unavailable.
"""

from __future__ import annotations

import os

# Set before transformers is imported: it reads the switch once, and this run must never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import psutil
import torch
from bench_methods import PEER_PACKAGES, Hyper, MethodRun, build
from bench_report import choose_lr, lr_text, write_report
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from omegaconf import DictConfig, OmegaConf, open_dict
from run_summary import RESULTS, peak_memory, quiet_trainer
from torch.optim import Optimizer

from lightning_hift import tasks
from lightning_hift.tasks import StepTimer

CONF = Path(__file__).resolve().parents[1] / "conf"
SUITES = ("tweets", "bbc", "smollm2")
METRICS = {"classifier": "val/acc", "causal_lm": "val/ppl"}  # the test split is scored as validation too


def compose(overrides: list[str]) -> DictConfig:
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra.compose(config_name="benchmark", overrides=overrides)


def output_dir(config: DictConfig) -> Path:
    return Path(config.out) if config.out is not None else RESULTS


def selected_suites(config: DictConfig) -> list[str]:
    if config.suite not in (*SUITES, "all"):
        raise SystemExit(f"Unknown suite={config.suite!r}; choose one of {[*SUITES, 'all']}.")
    return list(SUITES) if config.suite == "all" else [config.suite]


def check(config: DictConfig) -> DictConfig:
    """Applies ``steps=`` and ``eval_every=`` to the selected suites; exits if a suite or method does not exist."""
    for suite in selected_suites(config):
        for key in ("steps", "eval_every"):
            if config[key] is not None:
                config[suite][key] = config[key]
    known = {name for suite in selected_suites(config) for name in config[suite].methods}
    unknown = sorted(set(config.methods or ()) - known)
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown} for suite={config.suite}; choose from {sorted(known)}.")
    return config


def methods_of(config: DictConfig, suite: str, wanted: list[str] | None) -> list[str]:
    return [name for name in config[suite].methods if wanted is None or name in wanted]


def suite_settings(config: DictConfig, suite: str) -> dict[str, Any]:
    shared = {"suite": suite, "data_seed": config.data_seed, "accelerator": config.accelerator}
    return {**without(as_dict(config[suite]), ("methods",)), **shared}


def without(entries: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in entries.items() if key not in keys}


def as_dict(node: DictConfig) -> dict[str, Any]:
    settings = OmegaConf.to_container(node, resolve=True)
    assert isinstance(settings, dict)
    return settings  # type: ignore[return-value]


# --- one method, in its own process -------------------------------------------------------------------------------


class Meter(Callback):
    """Each optimizer step's loss and device memory, and each evaluation's score after its training seconds."""

    def __init__(self, timer: StepTimer, run: MethodRun, metric: str) -> None:
        self.timer, self.run, self.metric = timer, run, metric
        self.steps: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self._grads, self._last_step, self.recording = (0, 0), 0, True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        self._grads = self.run.grads(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step:
            return  # inside an accumulation window
        self._last_step = trainer.global_step
        device_state, host_state = self.run.optimizer_state(trainer)
        loss = float(trainer.callback_metrics["train/loss"])
        grads, trainable = self._grads
        self.steps.append(
            {"loss": loss, "grad_bytes": grads, "trainable": trainable, "state_bytes": device_state}
            | {"host_state_bytes": host_state, "master_bytes": self.run.masters(trainer)}
        )
        self._grads = (0, 0)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.recording or (self.evals and self.evals[-1]["step"] == trainer.global_step):
            return
        value = float(trainer.callback_metrics[self.metric])
        self.evals.append({"step": trainer.global_step, "train_seconds": sum(self.timer.seconds), "value": value})


def make_data(suite_cfg: DictConfig, data_seed: int, seed: int) -> LightningDataModule:
    """Splits cut with ``data_seed`` (the same for every run), the training batches shuffled with ``seed``."""
    settings = {key: value for key, value in suite_cfg.data.items() if key != "name"}
    kind = "causal_lm" if suite_cfg.task == "causal_lm" else suite_cfg.data.name
    data_class = {"causal_lm": tasks.LanguageModelingDataModule, "bbc": tasks.BBCNewsDataModule}.get(kind)
    data = (data_class or tasks.TweetSentimentDataModule)(tokenizer=suite_cfg.model, seed=data_seed, **settings)
    data.setup("fit")
    data.seed = seed  # type: ignore[attr-defined]  # read by train_dataloader only: the splits are cut
    return data


def run_one(config: DictConfig, suite: str, method: str, lr: float, seed: int) -> dict[str, Any]:
    """One method's record at one rate and seed (peak memory is the process's: the driver starts one per run)."""
    suite_cfg = config[suite]
    entry = suite_cfg.methods[method]
    record: dict[str, Any] = {
        **run_key(suite, method, lr, seed),
        "index": list(suite_cfg.methods).index(method),
        "kind": entry.kind,
        "lr_from": entry.get("lr_from", ""),
        "config": as_dict(entry),
        "settings": suite_settings(config, suite),
        "command": config.get("command", ""),
        "machine": machine(),
        "threads": torch.get_num_threads(),
    }
    started = time.perf_counter()
    others = other_cores()
    seed_everything(seed, workers=True)
    data = make_data(suite_cfg, config.data_seed, seed)
    try:
        if suite_cfg.task == "classifier":
            model = tasks.load_sequence_classifier(suite_cfg.model, data.num_classes)  # type: ignore[attr-defined]
        else:
            model = tasks.load_causal_lm(suite_cfg.model)
        examples = len(data.train_dataloader().dataset)  # type: ignore[arg-type]
        schedule = (suite_cfg.weight_decay, suite_cfg.warmup_ratio, suite_cfg.data.batch_size)
        hyper = Hyper(suite_cfg.task, lr, *schedule, seed, examples)
        record |= train(build(model, entry, hyper), config, suite_cfg, data)
    except Exception as err:
        if entry.kind not in PEER_PACKAGES:
            raise
        record |= {"status": "unavailable", "reason": describe_failure(err, PEER_PACKAGES[entry.kind])}
    return record | {"wall_seconds": time.perf_counter() - started, "other_cores": others()}


def run_key(suite: str, method: str, lr: float, seed: int) -> dict[str, Any]:
    return dict(suite=suite, method=method, lr=lr, seed=seed)


def other_cores() -> Any:
    """A function giving the average cores other processes kept busy since this call (it stretches step times)."""

    def sample() -> tuple[float, float]:
        machine, own = psutil.cpu_times(), psutil.Process().cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return time.monotonic(), busy - own.user - own.system

    started, busy = sample()

    def cores() -> float:
        now, busy_now = sample()
        return max(0.0, (busy_now - busy) / (now - started)) if now > started else 0.0

    return cores


def train(run: MethodRun, config: DictConfig, suite_cfg: DictConfig, data: LightningDataModule) -> dict[str, Any]:
    """Test score before, during and after the fit, then the validation score; returns the record's figures."""
    timer = StepTimer()
    metric = METRICS[suite_cfg.task]
    meter = Meter(timer, run, metric)
    test_loader = data.test_dataloader()
    trainer = quiet_trainer(
        accelerator=config.accelerator,
        devices=1,
        strategy=run.strategy,
        max_steps=suite_cfg.steps,
        # Counted in optimizer steps across epochs: "validation" during the fit scores the test split.
        val_check_interval=suite_cfg.eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        inference_mode=False,  # else fit's validation could not update metrics first scored before it
        # The meter measures a step before HiFT switches blocks; the timer's step includes the switch.
        callbacks=[meter, *run.callbacks, timer],
    )
    trainer.validate(run.module, dataloaders=test_loader, verbose=False)
    trainer.fit(run.module, train_dataloaders=data.train_dataloader(), val_dataloaders=test_loader)
    if meter.evals[-1]["step"] != trainer.global_step:
        trainer.validate(run.module, dataloaders=test_loader, verbose=False)
    meter.recording = False
    trainer.validate(run.module, dataloaders=data.val_dataloader(), verbose=False)
    steps = pd.DataFrame(meter.steps)
    steps["device_bytes"] = steps.grad_bytes + steps.state_bytes
    peaks = steps[["device_bytes", "grad_bytes", "state_bytes", "host_state_bytes", "master_bytes"]].max()
    return {
        "status": "ok",
        "description": run.description,
        "steps": trainer.global_step,
        "params": sum(p.numel() for p in run.module.parameters()),
        "seconds_per_step": timer.median_seconds,
        "train_seconds": sum(timer.seconds),
        **{key: int(value) for key, value in peaks.items()},
        "trainable_mean": float(steps.trainable.mean()),
        "trainable_max": int(steps.trainable.max()),
        "loss": steps.loss.tolist(),
        "evals": meter.evals,
        "val_score": float(trainer.callback_metrics[metric]),
        **run.facts,
        **peak_memory(trainer.strategy.root_device),
    }


def describe_failure(err: BaseException, package: str) -> str:
    if isinstance(err, ImportError):
        return f"{type(err).__name__}: {err} (install the bench extra: pip install -e '.[bench]')"
    frames = [frame for frame in traceback.extract_tb(err.__traceback__) if f"/{package}/" in frame.filename]
    if not frames:
        return f"{type(err).__name__}: {err}"
    inside = frames[-1].filename.rsplit(f"/{package}/", 1)[1]
    return f"{type(err).__name__}: {err} (raised in {package}/{inside}:{frames[-1].lineno})"


def machine() -> str:
    import lightning
    import transformers

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), "unknown CPU")
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no accelerator"
    versions = f"torch {torch.__version__}, Lightning {lightning.__version__}, transformers {transformers.__version__}"
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores{gpu}; {versions}"


# --- the driver ----------------------------------------------------------------------------------------------------


def record_path(out: Path, suite: str, method: str, lr: float, seed: int) -> Path:
    return out / "benchmark_runs" / suite / method / f"lr={lr_text(lr)}-seed={seed}.json"


def spawn(out: Path, suite: str, method: str, lr: float, seed: int) -> dict[str, Any] | None:
    """Run one method in a child process; return a failure record if it wrote none (its traceback is shown)."""
    command = [sys.executable, str(Path(__file__).resolve()), f"run_one={suite}/{method}/{lr!r}/{seed}", f"out={out}"]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None
    last = ""
    for line in child.stderr:  # shown as it comes, the last line kept as the reason of a failure
        sys.stderr.write(line)
        last = line.strip() or last
    code = child.wait()
    if code == 0 and record_path(out, suite, method, lr, seed).is_file():
        return None
    return {**run_key(suite, method, lr, seed), "status": "failed", "reason": f"exit code {code}: {last}"}


def write_record(out: Path, record: dict[str, Any]) -> None:
    path = record_path(out, record["suite"], record["method"], record["lr"], record["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def existing_record(config: DictConfig, suite: str, method: str, lr: float, seed: int) -> dict[str, Any] | None:
    """The saved record if made with the current settings (seeds, the rest of the grid aside); else it goes."""
    path = record_path(output_dir(config), suite, method, lr, seed)
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    current = {"settings": suite_settings(config, suite), "config": as_dict(config[suite].methods[method])}
    ignored = {"settings": ("seeds",), "config": ("lr_grid", "lr_from")}
    same = all(
        without(record.get(part, {}), ignored[part]) == without(current[part], ignored[part]) for part in current
    )
    if same and record.get("status") != "failed":
        return record
    path.unlink()
    return None


def child_main(job: str, out: Path) -> None:
    suite, method, lr, seed = job.split("/")
    config = OmegaConf.load(out / "benchmark_runs" / "config.yaml")
    assert isinstance(config, DictConfig)
    torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the Trainer's device banners, per run
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    write_record(out, run_one(config, suite, method, float(lr), int(seed)))


def prepare(config: DictConfig, overrides: list[str]) -> DictConfig:
    config = check(config)
    with open_dict(config):
        config.command = shlex.join(["python", "experiments/benchmark.py", *overrides])
    (output_dir(config) / "benchmark_runs").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, output_dir(config) / "benchmark_runs" / "config.yaml")
    return config


class Driver:
    """Runs what is missing: each method's grid at the first seed, then the other seeds at the chosen rate."""

    def __init__(self, config: DictConfig) -> None:
        self.out, self.config, self.failed = output_dir(config), config, []

    def run(self, suite: str, method: str, lr: float, seed: int) -> dict[str, Any]:
        record = existing_record(self.config, suite, method, lr, seed)
        if record is not None:
            return record
        print(f"== {suite}/{method} lr={lr_text(lr)} seed={seed}", flush=True)
        failure = spawn(self.out, suite, method, lr, seed)
        if failure is None:
            return existing_record(self.config, suite, method, lr, seed) or {}
        self.failed.append(f"{suite}/{method} lr={lr_text(lr)} seed={seed}")
        index = list(self.config[suite].methods).index(method)
        write_record(self.out, {**failure, "index": index, "settings": suite_settings(self.config, suite)})
        return failure

    def suite(self, suite: str, methods: list[str]) -> None:
        suite_cfg = self.config[suite]
        first, *others = range(suite_cfg.seeds)
        chosen: dict[str, float] = {}
        for method in methods:
            grid = [float(lr) for lr in suite_cfg.methods[method].lr_grid]
            # Records at rates the grid no longer has go, so that the report shows the grid as configured.
            for path in (self.out / "benchmark_runs" / suite / method).glob("*.json"):
                if float(json.loads(path.read_text())["lr"]) not in grid:
                    path.unlink()
            runs: list[dict[str, Any]] = []
            for lr in grid:
                runs.append(self.run(suite, method, lr, first))
                if runs[-1].get("status") == "unavailable":  # not on this machine, whatever the rate
                    break
            rate = choose_lr(runs, suite_cfg.task)
            if rate is not None:
                chosen[method] = rate
        for seed in others:
            for method, rate in chosen.items():
                self.run(suite, method, rate, seed)


@hydra.main(config_path=str(CONF), config_name="benchmark", version_base=None)
def main(config: DictConfig) -> None:
    benchmark(config, list(HydraConfig.get().overrides.task))


def benchmark(config: DictConfig, overrides: list[str]) -> None:
    out = output_dir(config)
    if config.run_one:
        child_main(config.run_one, out)
        return
    if config.report_only:
        write_report(out)
        return
    config = prepare(config, overrides)
    driver = Driver(config)
    for suite in selected_suites(config):
        if config.fresh:
            shutil.rmtree(out / "benchmark_runs" / suite, ignore_errors=True)
        driver.suite(suite, methods_of(config, suite, config.methods))
        write_report(out)  # after each suite, so that a long benchmark shows its finished parts
    if driver.failed:
        raise SystemExit(f"These runs failed (see their tracebacks above): {', '.join(driver.failed)}")


if __name__ == "__main__":
    main()

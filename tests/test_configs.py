"""The Hydra configs in conf/: every option composes, every config file instantiates, and train.py runs them."""

from __future__ import annotations

import importlib
import itertools
import json
import runpy
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lightning_hift import HiFTDDPStrategy, HiFTFSDPStrategy, HiFTStrategy, HiFTStrategyBase
from lightning_hift.tasks import minilm_path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = ROOT / "experiments"
# The groups a user picks from: hydra/ holds Hydra's own settings, local/ is per machine, each task picks its module.
NOT_CHOSEN = {"hydra", "local", "module"}
GROUPS = sorted(path.name for path in CONF.iterdir() if path.is_dir() and path.name not in NOT_CHOSEN)
CLASSIFICATION_TASKS = ["tweets", "tweets3", "bbc", "files"]
LM_TASKS = ["lm_tweets", "lm_bbc"]

# Options that only make a usable config together with another choice or value.
COMPANIONS = {
    "model=hub": ["model.name_or_path=minilm"],
    "model=smollm2": ["task=lm_tweets"],
    "task=files": ["task.data.train_file=train.csv"],
    "task=lm_tweets": ["model=smollm2"],
    "task=lm_bbc": ["model=smollm2"],
}
# Data small enough to build in about a second.
TINY_DATA = {
    "tweets": ["task.data.train_size=32", "task.data.val_size=16", "task.data.test_size=16"],
    "tweets3": ["task.data.train_size=32", "task.data.val_size=16", "task.data.test_size=16"],
    "bbc": ["task.data.train_size=32", "task.data.val_size=16", "task.data.test_size=16"],
    "files": [],
    "lm_tweets": ["task.data.train_blocks=4", "task.data.val_blocks=2", "task.data.test_blocks=2"],
    "lm_bbc": ["task.data.train_blocks=4", "task.data.val_blocks=2", "task.data.test_blocks=2"],
}
# A run of a few seconds: two batches of each split, on the tiny tweets.
TINY_RUN = ["trainer=debug", *TINY_DATA["tweets"]]


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str, output_dir: Path | str = "/unused", hydra: bool = False) -> DictConfig:
    """The composed train config; ``output_dir`` stands in for the run folder Hydra sets only when running."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=[*overrides, f"output_dir={output_dir}"], return_hydra_config=hydra)


def with_companions(override: str) -> list[str]:
    return [override, *COMPANIONS.get(override, [])]


@pytest.fixture(scope="module")
def train_script() -> ModuleType:
    """experiments/train.py as a module; it imports its sibling run_summary.py the way a script does."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        return importlib.import_module("train")
    finally:
        sys.path.remove(str(EXPERIMENTS))


@pytest.fixture
def labelled_csv(tmp_path: Path) -> Path:
    path = tmp_path / "labelled.csv"
    rows = [f"{'good' if i % 2 else 'bad'} movie number {i},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


# Composition


@pytest.mark.parametrize(
    "override", [f"{group}={option}" for group in GROUPS for option in options(group)] + ["~logger"]
)
@pytest.mark.integration
def test_every_option_composes_and_resolves(override: str) -> None:
    cfg = compose_train(*with_companions(override))
    OmegaConf.to_container(cfg, resolve=True)
    # Only the classifier's head size is left open: train.py reads it from the data.
    assert OmegaConf.missing_keys(cfg) <= {"task.module.num_labels"}


@pytest.mark.integration
def test_the_defaults_build_the_main_job(train_script: ModuleType) -> None:
    """What the README promises of `make train`: HiFT on the CPU, MiniLM classifying tweets, at the rate and length
    the config names, scored on test accuracy."""
    cfg = compose_train(*TINY_DATA["tweets"])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy, HiFTStrategy) and trainer.strategy.lr_scale == "blocks"
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert trainer.max_steps == cfg.max_steps
    data = instantiate(cfg.task.data)
    module = train_script.build_module(cfg.task.module, data)
    config = module.model.config  # all-MiniLM-L6-v2 with a fresh 2-class head
    assert (config.model_type, config.num_hidden_layers, config.num_labels) == ("bert", 6, 2)
    assert module.hparams["lr"] == cfg.lr
    assert cfg.metric == "test/acc"


def test_hift_and_full_fine_tuning_share_the_rate_and_hift_trains_longer() -> None:
    hift, fpft = compose_train("hift=default"), compose_train("hift=fpft")
    hift_trainer = instantiate(hift.trainer, logger=False, enable_checkpointing=False)
    fpft_trainer = instantiate(fpft.trainer, logger=False, enable_checkpointing=False)
    assert not isinstance(fpft_trainer.strategy, HiFTStrategyBase)
    assert isinstance(hift_trainer.strategy, HiFTStrategy) and hift_trainer.strategy.lr_scale == "blocks"
    assert hift.task.module.lr == fpft.task.module.lr
    assert hift_trainer.max_steps > fpft_trainer.max_steps


def test_command_line_values_win_over_the_groups() -> None:
    cfg = compose_train("hift=top2down", "lr=1e-3", "max_steps=7", "batch_size=4")
    assert cfg.task.module.lr == 1e-3
    assert cfg.trainer.max_steps == 7
    assert cfg.task.data.batch_size == 4


@pytest.mark.parametrize("task", LM_TASKS)
def test_language_modelling_reports_perplexity(task: str) -> None:
    cfg = compose_train(*with_companions(f"task={task}"))
    assert cfg.task.module._target_.endswith("CausalLanguageModel")
    assert (cfg.metric, cfg.mode) == ("test/ppl", "min")


def test_experiments_choose_model_and_task_but_not_the_method() -> None:
    cfg = compose_train("experiment=smollm2_lm", "hift=fpft")
    assert cfg.model.name_or_path == "smollm2"
    assert cfg.task.data.corpus == "tweets"
    assert cfg.trainer.strategy == "auto"


@pytest.mark.integration
def test_sweep_is_a_multirun_grid_whose_points_compose() -> None:
    cfg = compose_train("sweep=hift_grid", hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = {key: value.split(",") for key, value in cfg.hydra.sweeper.params.items()}
    assert params == {
        "hift": ["bottom2up", "top2down", "random"],
        "hift.strategy.layers_per_block": ["1", "2"],
        "optimizer": ["adamw", "sgd"],
    }
    for values in itertools.product(*params.values()):
        point = compose_train(*(f"{key}={value}" for key, value in zip(params, values, strict=True)))
        assert point.trainer.strategy.order == values[0]
        assert point.trainer.strategy.layers_per_block == int(values[1])


# Errors


def test_a_missing_required_value_fails() -> None:
    cfg = compose_train("task=files")
    with pytest.raises(MissingMandatoryValue, match="train_file"):
        instantiate(cfg.task.data)


def test_an_unknown_option_fails_and_lists_the_known_ones() -> None:
    with pytest.raises(MissingConfigException, match="hift/sideways") as error:
        compose_train("hift=sideways")
    assert "top2down" in str(error.value)


# Instantiation, group by group


@pytest.mark.integration
@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_classification_tasks_build_data_and_module_that_fit_together(task: str, labelled_csv: Path) -> None:
    file = [f"task.data.train_file={labelled_csv}"] if task == "files" else []
    cfg = compose_train(f"task={task}", *file, *TINY_DATA[task])
    data: LightningDataModule = instantiate(cfg.task.data)
    data.setup("fit")
    module: LightningModule = instantiate(cfg.task.module, num_labels=data.num_classes)  # type: ignore[attr-defined]
    batch = next(iter(data.train_dataloader()))
    assert module(batch).logits.shape == (len(batch["labels"]), data.num_classes)  # type: ignore[attr-defined]


def test_the_hub_model_takes_a_folder(train_script: ModuleType) -> None:
    cfg = compose_train("model=hub", f"model.name_or_path={minilm_path()}", *TINY_DATA["tweets"])
    data = instantiate(cfg.task.data)
    module = train_script.build_module(cfg.task.module, data)
    assert module.hparams["num_labels"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("task", LM_TASKS)
def test_language_modelling_tasks_build_data_and_module_that_fit_together(task: str) -> None:
    cfg = compose_train(*with_companions(f"task={task}"), *TINY_DATA[task], "task.data.block_size=32")
    data: LightningDataModule = instantiate(cfg.task.data)
    data.setup("fit")
    module: LightningModule = instantiate(cfg.task.module)
    batch = next(iter(data.train_dataloader()))
    assert torch.isfinite(module(batch).loss)


@pytest.mark.parametrize("option", options("optimizer"))
def test_optimizers_are_factories_of_params_and_lr(option: str) -> None:
    factory = instantiate(compose_train(f"optimizer={option}").optimizer)
    weight = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = factory([{"params": [weight], "weight_decay": 0.01}], lr=0.1)
    weight.sum().backward()
    optimizer.step()
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert not torch.equal(weight, torch.ones(2, 2))


@pytest.mark.parametrize("option", options("hift"))
def test_hift_options_give_the_trainer_its_strategy(option: str) -> None:
    blocks = [] if option == "fpft" else ["hift.strategy.layers_per_block=2"]
    cfg = compose_train(f"hift={option}", *blocks)
    trainer: Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    if option == "fpft":
        assert not isinstance(trainer.strategy, HiFTStrategyBase)
        return
    expected = {"ddp": HiFTDDPStrategy, "fsdp": HiFTFSDPStrategy}.get(option, HiFTStrategy)
    assert isinstance(trainer.strategy, expected)
    assert trainer.strategy.order == (option if option in ("top2down", "random", "grad_norm") else "bottom2up")
    assert trainer.strategy.layers_per_block == 2


@pytest.mark.parametrize(
    "option", [pytest.param(o, marks=pytest.mark.gpu) if o == "gpu" else o for o in options("trainer")]
)
def test_trainers_instantiate(option: str) -> None:
    cfg = compose_train(f"trainer={option}", "max_steps=3")
    trainer: Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == (2 if option == "debug" else 3)  # fast_dev_run sets its own number of steps


@pytest.mark.parametrize("option", options("logger"))
def test_loggers_write_into_the_run_folder(option: str, tmp_path: Path) -> None:
    if option == "tensorboard":
        pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    logger = instantiate(compose_train(f"logger={option}", output_dir=tmp_path).logger)
    assert Path(logger.log_dir).parent == tmp_path


def test_checkpoint_callback_keeps_the_best_by_the_task_monitor(tmp_path: Path) -> None:
    cfg = compose_train("callbacks=checkpoint", "task=lm_tweets", "model=smollm2", output_dir=tmp_path)
    (checkpoint,) = [instantiate(node) for node in cfg.callbacks.values()]
    assert isinstance(checkpoint, ModelCheckpoint)
    assert (checkpoint.monitor, checkpoint.mode) == ("val/loss", "min")
    assert Path(checkpoint.dirpath) == tmp_path / "checkpoints"


# train.py, end to end


def run_script(monkeypatch: pytest.MonkeyPatch, *overrides: str) -> None:
    """Run experiments/train.py in this process, as ``python experiments/train.py OVERRIDES`` would."""
    # Hydra finds conf/ relative to the script only when the script runs as __main__.
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    monkeypatch.setattr(sys, "argv", ["train.py", *overrides])
    runpy.run_path(str(EXPERIMENTS / "train.py"), run_name="__main__")


@pytest.mark.integration
def test_train_runs_and_writes_its_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_script(monkeypatch, *TINY_RUN, f"hydra.run.dir={tmp_path}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["metric"] == "test/acc" and 0 <= metrics["test/acc"] <= 1
    assert metrics["steps"] == 2 and metrics["seconds_per_step"] > 0
    assert metrics["strategy"] == "hift bottom2up m=1 lr x8"
    assert metrics["peak_rss_bytes"] > 0
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert "seconds / step" in capsys.readouterr().out


@pytest.mark.integration
def test_train_tests_the_best_checkpoint(train_script: ModuleType, tmp_path: Path) -> None:
    cfg = compose_train(
        "callbacks=checkpoint", "max_steps=2", "batch_size=16", *TINY_DATA["tweets"], output_dir=tmp_path
    )
    metrics = train_script.train(cfg)
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert checkpoint.name == "step2.ckpt"
    assert metrics["steps"] == 2 and "test/acc" in metrics
    assert (tmp_path / "csv" / "metrics.csv").is_file()


@pytest.mark.integration
def test_train_exports_a_hugging_face_folder(train_script: ModuleType, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = compose_train("export=true", "max_steps=2", "batch_size=16", *TINY_DATA["tweets"], output_dir=tmp_path)
    train_script.train(cfg)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert model.config.num_labels == 2
    assert AutoTokenizer.from_pretrained(tmp_path / "model")("hello")["input_ids"]


LAST_LAYER = "bert.encoder.layer.5.output.dense.weight"  # MiniLM has six layers


@pytest.mark.slow
def test_train_exports_whole_weights_from_sharded_processes(tmp_path: Path) -> None:
    # hift=fsdp as a user runs it: the script starts its second process itself, each holds half of every weight.
    from transformers import AutoModelForSequenceClassification

    overrides = ["hift=fsdp", "trainer.devices=2", "export=true", "test=false", "max_steps=2", "batch_size=16"]
    command = [sys.executable, str(EXPERIMENTS / "train.py"), *overrides, *TINY_DATA["tweets"]]
    command.append(f"hydra.run.dir={tmp_path}")
    result = subprocess.run(command, cwd=EXPERIMENTS.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    start = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    # HiFT's first two steps train the embeddings, then the first layer: whole tensors, changed, come out.
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        assert exported.get_parameter(name).shape == start.get_parameter(name).shape
        assert not torch.equal(exported.get_parameter(name), start.get_parameter(name)), name
    assert torch.equal(exported.get_parameter(LAST_LAYER), start.get_parameter(LAST_LAYER))  # not reached yet


@pytest.mark.slow
def test_train_runs_the_language_model(train_script: ModuleType, tmp_path: Path) -> None:
    overrides = [*TINY_DATA["lm_tweets"], "task.data.block_size=32", "trainer=debug"]
    metrics = train_script.train(compose_train("experiment=smollm2_lm", *overrides, output_dir=tmp_path))
    assert metrics["metric"] == "test/ppl" and metrics["test/ppl"] > 1


@pytest.mark.slow
def test_the_sweep_runs_every_point_in_its_own_folder(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(EXPERIMENTS / "train.py"),
        "sweep=hift_grid",
        *TINY_RUN,
        f"hydra.sweep.dir={tmp_path}",
    ]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
    folders = sorted(path.parent.name for path in tmp_path.glob("*/metrics.json"))
    assert len(folders) == 12
    # Each folder is named by its job number and overrides (the tiny-run ones included).
    number, overrides = folders[0].split("_", 1)
    assert number == "0"
    assert {"hift=bottom2up", "hift.strategy.layers_per_block=1", "optimizer=adamw"} <= set(overrides.split(","))

"""Bad input fails before the first optimizer step with a message that names what to change.

One table: strategy arguments, model, Trainer set-up, data, checkpoint and Hydra configuration. Every case that
reaches ``trainer.fit`` also checks that no step was taken, no parameter changed and a refused checkpoint is left
as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import MissingMandatoryValue

from lightning_hift import HiFTConfigError
from lightning_hift.tasks import TextFileDataModule, TweetSentimentDataModule
from tests.helpers.lightning import (
    BackboneFinetuning,
    HiFTCallback,
    HiFTDDPStrategy,
    HiFTStrategy,
    ModelCheckpoint,
)
from tests.helpers.modules import TinyModule, quiet_trainer

CONF = Path(__file__).resolve().parents[1] / "conf"


class NoRepeatedLayers(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16)])  # type: ignore[assignment]


class ManualOptimization(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(TinyModule):
    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.net.layers.parameters(), lr=0.1), torch.optim.SGD(self.net.head.parameters())]


class NoOptimizer(TinyModule):
    def configure_optimizers(self) -> Any:
        return None


def all_frozen() -> TinyModule:
    module = TinyModule()
    module.requires_grad_(False)
    return module


def fit_fails(
    make_module: Callable[[], TinyModule] = TinyModule,
    strategy: Any = None,
    ckpt_path: Path | None = None,
    **trainer_kwargs: Any,
) -> None:
    """Fit; the caller expects an exception. Afterwards: no optimizer step, no parameter changed."""
    start = torch.load(ckpt_path, weights_only=True)["global_step"] if ckpt_path else 0
    written = ckpt_path.read_bytes() if ckpt_path else b""
    module = make_module()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer = quiet_trainer(
        strategy=strategy if strategy is not None else HiFTStrategy(), max_steps=4, **trainer_kwargs
    )
    try:
        trainer.fit(module, ckpt_path=ckpt_path)
    finally:
        assert trainer.global_step in (0, start)  # 0 when it failed before the loops were restored
        if ckpt_path is None:
            for name, p in module.named_parameters():
                assert torch.equal(p, before[name]), name
        else:
            assert ckpt_path.read_bytes() == written  # the checkpoint that was refused is left as it was


def checkpoint(tmp_path: Path, **strategy: Any) -> Path:
    """A checkpoint written by a short HiFT run with the given strategy arguments."""
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(
        strategy=HiFTStrategy(**strategy), max_steps=2, callbacks=[saver], enable_checkpointing=True
    )
    trainer.fit(TinyModule())
    return tmp_path / "step=2.ckpt"


def tweets_csv(tmp_path: Path, header: str, rows: list[str]) -> Path:
    path = tmp_path / "tweets.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def hydra_compose(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
        str(cfg.task.data.train_file)  # resolving a ??? value raises


Case = tuple[Callable[[Path], Any], type[BaseException], str]

CASES: dict[str, Case] = {
    # strategy arguments, at construction
    "layers_per_block=0": (lambda _: HiFTStrategy(layers_per_block=0), HiFTConfigError, "layers_per_block"),
    "layers_per_block=1.5": (lambda _: HiFTStrategy(layers_per_block=1.5), HiFTConfigError, "layers_per_block"),  # type: ignore[arg-type]
    "switch_every=0": (lambda _: HiFTStrategy(switch_every=0), HiFTConfigError, "switch_every"),
    "unknown order": (lambda _: HiFTStrategy(order="sideways"), HiFTConfigError, "order"),
    "unknown optimizer_state": (lambda _: HiFTStrategy(optimizer_state="disk"), HiFTConfigError, "optimizer_state"),
    "unknown lr_update": (lambda _: HiFTStrategy(lr_update="never"), HiFTConfigError, "lr_update"),
    "unknown on_nonfinite": (lambda _: HiFTStrategy(on_nonfinite="ignore"), HiFTConfigError, "on_nonfinite"),
    "frozen as a string": (lambda _: HiFTStrategy(frozen="net.embed.*"), HiFTConfigError, "frozen"),  # type: ignore[arg-type]
    "frozen of numbers": (lambda _: HiFTStrategy(frozen=[123]), HiFTConfigError, "frozen"),  # type: ignore[list-item]
    "layers as a number": (lambda _: HiFTStrategy(layers=123), HiFTConfigError, "layers"),  # type: ignore[arg-type]
    "seed not a number": (lambda _: HiFTStrategy(seed="zero"), HiFTConfigError, "seed"),  # type: ignore[arg-type]
    "bucket_cap_mb=0": (lambda _: HiFTDDPStrategy(bucket_cap_mb=0), HiFTConfigError, "bucket_cap_mb"),
    # model and Trainer set-up, at fit start
    "layers path missing": (
        lambda _: fit_fails(strategy=HiFTStrategy(layers="net.missing")),
        HiFTConfigError,
        "layers='net.missing'",
    ),
    "layers path not a list": (
        lambda _: fit_fails(strategy=HiFTStrategy(layers="net.head")),
        HiFTConfigError,
        "layers",
    ),
    "nothing trainable": (lambda _: fit_fails(all_frozen), HiFTConfigError, "requires grad"),
    "frozen matches nothing": (
        lambda _: fit_fails(strategy=HiFTStrategy(frozen=["net.embeddings.*"])),
        HiFTConfigError,
        "frozen",
    ),
    "everything frozen by pattern": (
        lambda _: fit_fails(strategy=HiFTStrategy(frozen=["*"])),
        HiFTConfigError,
        "frozen",
    ),
    "manual optimization": (lambda _: fit_fails(ManualOptimization), HiFTConfigError, "automatic"),
    "two optimizers": (lambda _: fit_fails(TwoOptimizers), Exception, "multiple optimizers"),
    "no optimizer": (lambda _: fit_fails(NoOptimizer), HiFTConfigError, "optimizer"),
    "two devices": (lambda _: fit_fails(devices=2), HiFTConfigError, "devices=1"),
    "BaseFinetuning": (
        lambda _: fit_fails(callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)]),
        HiFTConfigError,
        "frozen=",
    ),
    "HiFTCallback without HiFT": (
        lambda _: fit_fails(strategy="auto", callbacks=[HiFTCallback()]),
        HiFTConfigError,
        "strategy='hift'",
    ),
    # checkpoints
    "resume with another layers_per_block": (
        lambda tmp: fit_fails(strategy=HiFTStrategy(layers_per_block=2), ckpt_path=checkpoint(tmp)),
        HiFTConfigError,
        "layers_per_block",
    ),
    "resume with another order": (
        lambda tmp: fit_fails(strategy=HiFTStrategy(order="random"), ckpt_path=checkpoint(tmp)),
        HiFTConfigError,
        "order",
    ),
    "resume the random order with another seed": (
        lambda tmp: fit_fails(strategy=HiFTStrategy(order="random", seed=1), ckpt_path=checkpoint(tmp, order="random")),
        HiFTConfigError,
        "seed",
    ),
    "resume with another lr_update": (
        lambda tmp: fit_fails(strategy=HiFTStrategy(lr_update="step"), ckpt_path=checkpoint(tmp)),
        HiFTConfigError,
        "lr_update",
    ),
    "resume a different model": (
        lambda tmp: fit_fails(NoRepeatedLayers, HiFTStrategy(layers="net.layers"), ckpt_path=checkpoint(tmp)),
        RuntimeError,
        "state_dict",
    ),
    # data
    "tweets file missing": (
        lambda tmp: TweetSentimentDataModule(csv_path=tmp / "nope.csv"),
        FileNotFoundError,
        "nope.csv",
    ),
    "tweets column missing": (
        lambda tmp: TweetSentimentDataModule(
            tokenizer="minilm", csv_path=tweets_csv(tmp, "sentiment,body", ["positive,hi"])
        ).setup("fit"),
        ValueError,
        "text",
    ),
    "files: unsupported extension": (
        lambda tmp: TextFileDataModule(tmp / "data.parquet").setup("fit"),
        ValueError,
        r"\.csv",
    ),
    # Hydra configuration
    "hydra: missing required value": (lambda _: hydra_compose(["task=files"]), MissingMandatoryValue, "train_file"),
    "hydra: unknown group option": (lambda _: hydra_compose(["hift=sideways"]), ConfigCompositionException, "sideways"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, tmp_path: Path) -> None:
    action, error, message = CASES[case]
    with pytest.raises(error, match=message):
        action(tmp_path)


FIX = re.compile(
    r"\b(pass|use|choose|remove|set|build|resume|freeze|narrow|correct|return|install|must be)\b", re.IGNORECASE
)
"""The words of a HiFT error's instruction: what the user should do or give instead."""


@pytest.mark.parametrize("case", [case for case, (_, error, _) in CASES.items() if error is HiFTConfigError])
def test_every_hift_error_says_what_to_do_instead(case: str, tmp_path: Path) -> None:
    action = CASES[case][0]
    with pytest.raises(HiFTConfigError) as raised:
        action(tmp_path)
    assert FIX.search(str(raised.value)), f"no instruction in: {raised.value}"

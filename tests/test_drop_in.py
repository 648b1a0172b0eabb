"""Modules people already have: any kind of model, and both Lightning packages, train under HiFT unchanged."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_hift
import lightning_hift.pytorch_lightning
from tests.helpers.lightning import LightningModule, seed_everything
from tests.helpers.modules import StepRecorder, fit
from tests.helpers.plain_models import BoringLike, LitAutoEncoder, MnistMLP, SharedBlockTwice, SmallCNN
from tests.helpers.tiny_models import TINY_MODELS


class PlainTask(LightningModule):
    """Trains any model on random data: cross-entropy on class logits, or reconstruction of its flattened input."""

    def __init__(self, model: nn.Module, inputs: Tensor, targets: Tensor | None) -> None:
        super().__init__()
        self.model = model
        self.data = TensorDataset(inputs, targets) if targets is not None else TensorDataset(inputs)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        output = self.model(batch[0])
        output = getattr(output, "logits", output)  # a Hugging Face model returns an output object
        if output.dim() == 3:  # per-token logits: classify the mean
            output = output.mean(dim=1)
        if len(batch) == 1:
            return nn.functional.mse_loss(output, batch[0].flatten(1))
        return nn.functional.cross_entropy(output, batch[1])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def _random(shape: tuple[int, ...], classes: int | None) -> tuple[Tensor, Tensor | None]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(16, *shape, generator=generator)
    return inputs, torch.randint(0, classes, (16,), generator=generator) if classes else None


def _tokens(classes: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 32, (16, 6), generator=generator), torch.randint(0, classes, (16,), generator=generator)


MODULES: dict[str, Callable[[], PlainTask]] = {
    "mnist-mlp": lambda: PlainTask(MnistMLP(), *_random((1, 28, 28), 10)),
    "autoencoder": lambda: PlainTask(LitAutoEncoder(), *_random((1, 28, 28), None)),
    "boring": lambda: PlainTask(BoringLike(), *_random((32,), 2)),
    "cnn-batchnorm": lambda: PlainTask(SmallCNN(), *_random((1, 12, 12), 10)),
    "shared-block": lambda: PlainTask(SharedBlockTwice(), *_tokens(4)),
    "albert": lambda: PlainTask(TINY_MODELS["albert-seqcls"](), *_tokens(2)),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_any_model_trains_block_by_block_without_layers(name: str) -> None:
    seed_everything(0)
    module = MODULES[name]()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    recorder = StepRecorder()
    trainer = fit(module, "hift", 8, [recorder])
    strategy: Any = trainer.strategy
    names_of = [set(block.names) for block in strategy.blocks]
    for active, changed in zip(recorder.active, recorder.changed, strict=True):
        assert active is not None and changed <= names_of[active]  # weight decay is on: frozen blocks stay put
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, start[n])}
    assert moved == set(start)  # two cycles reach every parameter


def _tiny_module_class(package: Any) -> type:
    """The same small classifier written against ``package`` (``lightning.pytorch`` or ``pytorch_lightning``)."""

    class Classifier(package.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Embedding(32, 8), *(nn.Linear(8, 8) for _ in range(3)), nn.Linear(8, 4))
            self.data = TensorDataset(*_tokens(4))

        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]).mean(dim=1), batch[1])

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.data, batch_size=4)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
            scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=10)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return Classifier


def _fit_with(package_name: str, strategy: Any) -> tuple[dict[str, Tensor], Any]:
    package = importlib.import_module(package_name)
    package.seed_everything(0)
    module = _tiny_module_class(package)()
    trainer = package.Trainer(
        accelerator="cpu",
        strategy=strategy,
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return {n: p.detach().clone() for n, p in module.named_parameters()}, trainer


@pytest.mark.parametrize(
    "strategy",
    ["hift", "hift_top2down", "hift_random", lambda hift: hift.HiFTStrategy(layers_per_block=2, order="random")],
    ids=["hift", "hift_top2down", "hift_random", "object"],
)
def test_both_lightning_packages_train_alike_with_their_own_classes(strategy: Any) -> None:
    results = {}
    for package_name, hift in [
        ("lightning.pytorch", lightning_hift),
        ("pytorch_lightning", lightning_hift.pytorch_lightning),
    ]:
        package = importlib.import_module(package_name)
        params, trainer = _fit_with(package_name, strategy(hift) if callable(strategy) else strategy)
        assert isinstance(trainer.strategy, hift.HiFTStrategy)
        assert isinstance(trainer.strategy, package.strategies.Strategy)
        callbacks = [c for c in trainer.callbacks if isinstance(c, lightning_hift.HiFTCallbackBase)]
        assert len(callbacks) == 1 and isinstance(callbacks[0], package.Callback)
        assert trainer.optimizers[0].param_groups[0]["lr"] < 1e-2  # the delayed schedule moved
        results[package_name] = params
    for name, value in results["lightning.pytorch"].items():
        assert torch.equal(value, results["pytorch_lightning"][name]), name


@pytest.mark.parametrize("package_name", ["lightning.pytorch", "pytorch_lightning"])
def test_every_name_is_registered_with_both_packages(package_name: str) -> None:
    package = importlib.import_module(package_name)
    hift = lightning_hift if package_name == "lightning.pytorch" else lightning_hift.pytorch_lightning
    registry = package.strategies.StrategyRegistry
    singles = {"hift": "bottom2up", "hift_top2down": "top2down", "hift_random": "random"}
    for name, order in singles.items():
        assert registry[name]["strategy"] is hift.HiFTStrategy
        assert registry.get(name).order == order
    for name, start_method in {"hift_ddp": "popen", "hift_ddp_spawn": "spawn", "hift_ddp_fork": "fork"}.items():
        assert registry[name]["strategy"] is hift.HiFTDDPStrategy
        assert registry[name]["init_params"] == {"start_method": start_method}


def test_peft_lora_adapters_train_block_by_block_and_the_base_stays_frozen() -> None:
    peft = pytest.importorskip("peft")
    base = TINY_MODELS["bert-seqcls"]()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    module = PlainTask(model, *_tokens(2))
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    recorder = StepRecorder()
    trainer = fit(module, "hift", 8, [recorder])
    strategy: Any = trainer.strategy
    assert {n for block in strategy.blocks for n in block.names} == trainable  # adapters (and the head) only
    for active, changed in zip(recorder.active, recorder.changed, strict=True):
        assert active is not None and changed <= set(strategy.blocks[active].names)
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, start[n])}
    assert moved == trainable
    assert {n for n, p in module.named_parameters() if p.requires_grad} == trainable  # handed back as it came

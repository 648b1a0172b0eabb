"""Activation checkpointing under HiFT: backward starts at the active block, and the model comes back as it was.

Hugging Face's ``gradient_checkpointing_enable`` makes the embeddings' output require grad, which under HiFT would
recompute and back-propagate through the frozen layers below the active block at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hift.blocks import Block, partition
from lightning_hift.units import EMBEDDINGS, OUTPUT
from tests.helpers.lightning import Callback, HiFTStrategy, LightningModule
from tests.helpers.modules import StepRecorder, fit
from tests.helpers.tiny_models import TINY_MODELS, VOCAB

MODELS = ["llama-lm", "bert-seqcls"]
SAMPLES, SEQ = 8, 8


def enable_checkpointing(model: Any, use_reentrant: bool) -> None:
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class HFTask(LightningModule):
    """A tiny Hugging Face model trained on random tokens: next-token prediction or two-class labels."""

    def __init__(self, key: str, use_reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TINY_MODELS[key]()
        if use_reentrant is not None:
            enable_checkpointing(self.model, use_reentrant)
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(1, VOCAB, (SAMPLES, SEQ), generator=generator)
        causal = key.endswith("-lm")
        labels = tokens if causal else torch.randint(0, 2, (SAMPLES,), generator=generator)
        self.data = TensorDataset(tokens, labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, labels = batch
        return self.model(input_ids=tokens, labels=labels).loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


@dataclass
class Step:
    """What one optimizer step did, seen before the optimizer applied it."""

    active: int
    forwards: dict[str, int]
    """Runs of each layer's inside: 2 when backward recomputed the layer."""
    hooked: list[str]
    """Layers with more forward pre-hooks than they had before fitting."""


@dataclass
class Run:
    module: HFTask
    blocks: list[Block]
    layers: list[str]
    """The layer units, by depth."""
    pre_hooks_before: dict[str, int]
    input_hook_before: bool
    steps: list[Step] = field(default_factory=list)
    changed: list[set[str]] = field(default_factory=list)
    """The parameters each step changed."""
    grads: list[dict[str, Tensor]] = field(default_factory=list)
    """Each step's gradients, as the optimizer was about to apply them."""


class StepWatcher(Callback):
    """Records a :class:`Step` for every optimizer step of ``run``."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.step = Step(0, {}, [])
        self.forwards: dict[str, int] = {}
        for name in run.layers:
            # Hugging Face checkpoints a layer's forward, not its __call__: the layer's own hooks run once a step,
            # the modules inside it again when backward recomputes it.
            first_child = next(run.module.get_submodule(name).children())
            first_child.register_forward_hook(lambda *_, name=name: self._count(name))

    def _count(self, name: str) -> None:
        self.forwards[name] = self.forwards.get(name, 0) + 1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        # Read here: the HiFT callback activates the next block in on_train_batch_end.
        pre_hooks = pre_hook_counts(pl_module)
        hooked = [name for name in self.run.layers if pre_hooks[name] > self.run.pre_hooks_before[name]]
        self.step = Step(trainer.strategy.active_block, {}, hooked)
        self.forwards = self.step.forwards

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.run.steps.append(self.step)


def pre_hook_counts(module: nn.Module) -> dict[str, int]:
    return {name: len(inner._forward_pre_hooks) for name, inner in module.named_modules()}


@cache
def train(key: str, use_reentrant: bool | None) -> Run:
    """A cycle and one more step, each block active in turn; cached, as several tests read the same run."""
    module = HFTask(key, use_reentrant)
    blocks = partition(module)
    layers = [name for block in blocks for name in block.unit_names if name not in (EMBEDDINGS, OUTPUT)]
    run = Run(module, blocks, layers, pre_hook_counts(module), hasattr(module.model, "_require_grads_hook"))
    recorder = StepRecorder(grads=True)
    fit(module, HiFTStrategy(), max_steps=len(blocks) + 1, callbacks=[StepWatcher(run), recorder])
    run.changed, run.grads = recorder.changed, recorder.grads
    return run


def lowest_layer_in_backward(run: Run, active: int) -> int:
    """Depth of the lowest layer that backward must go through when block ``active`` trains."""
    units = run.blocks[active].unit_names
    if units[0] == EMBEDDINGS:
        return 0
    return next((run.layers.index(unit) for unit in units if unit in run.layers), len(run.layers))


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("key", MODELS)
def test_backward_stops_at_the_active_block(key: str, use_reentrant: bool) -> None:
    run = train(key, use_reentrant)
    for step in run.steps:
        below = run.layers[: lowest_layer_in_backward(run, step.active)]
        assert {name: step.forwards[name] for name in below} == dict.fromkeys(below, 1), f"block {step.active}"


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("key", MODELS)
def test_checkpointed_layers_are_still_recomputed(key: str, use_reentrant: bool) -> None:
    run = train(key, use_reentrant)
    for step in run.steps:
        # The active layer and the frozen ones above it, through which its gradient flows.
        above = run.layers[lowest_layer_in_backward(run, step.active) :]
        assert {name: step.forwards[name] for name in above} == dict.fromkeys(above, 2), f"block {step.active}"


@pytest.mark.integration
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("key", MODELS)
def test_each_step_trains_the_active_block_with_the_gradients_of_a_run_without_checkpointing(
    key: str, use_reentrant: bool
) -> None:
    run, plain = train(key, use_reentrant), train(key, None)
    assert [step.active for step in run.steps] == [step.active for step in plain.steps] == [*range(len(run.blocks)), 0]
    for step, changed in zip(run.steps, run.changed, strict=True):
        assert changed == set(run.blocks[step.active].names), f"block {step.active}"
    # Over the first cycle both runs start every step from the same weights.
    for step, grads, plain_grads in zip(run.steps[: len(run.blocks)], run.grads, plain.grads, strict=False):
        assert grads.keys() == plain_grads.keys() == set(run.blocks[step.active].names)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("key", MODELS)
def test_only_the_active_layers_are_hooked_and_the_model_comes_back_as_it_was(key: str, use_reentrant: bool) -> None:
    run = train(key, use_reentrant)
    assert run.input_hook_before  # Hugging Face's hook on the input embeddings
    for step in run.steps:
        active_layers = [name for name in run.layers if name in run.blocks[step.active].unit_names]
        assert step.hooked == active_layers, f"block {step.active}"
    assert hasattr(run.module.model, "_require_grads_hook")
    assert pre_hook_counts(run.module) == run.pre_hooks_before


@pytest.mark.parametrize("key", MODELS)
def test_without_checkpointing_nothing_is_added_or_taken(key: str) -> None:
    module = HFTask(key, use_reentrant=None)
    module.model.enable_input_require_grads()  # e.g. for adapters; with no layer checkpointed HiFT leaves it be
    before = pre_hook_counts(module)
    untouched: list[bool] = []

    class Watch(Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            hooks = pre_hook_counts(pl_module) == before
            untouched.append(hooks and hasattr(pl_module.model, "_require_grads_hook"))

    fit(module, HiFTStrategy(), max_steps=3, callbacks=[Watch()])
    assert untouched == [True] * 3

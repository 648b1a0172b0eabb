"""A compiled model under HiFT: each layer is compiled on its own, so block switches do not recompile without end.

Dynamo guards a graph on the ``requires_grad`` of the parameters it reads, so a graph of the whole model would be
recompiled at every block switch, and after ``recompile_limit`` (8) graphs dynamo falls back to eager. The tests
count dynamo's graphs (never time anything) with ``fail_on_recompile_limit_hit`` on, so that a fallback to eager
fails a test instead of passing unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from lightning_hift.compile import COMPILED_ATTRIBUTES, compile_by_unit
from tests.helpers.lightning import Callback, HiFTStrategy, Trainer, pl
from tests.helpers.modules import WIDTH, TinyModule, fit
from tests.helpers.tiny_models import TinyMLPStack

LAYERS = 8
UNITS = LAYERS + 2  # embeddings, the layers, the output end: 10 blocks, more than dynamo's recompile_limit of 8
CYCLES = 2
TRAINING_STATES = 3
"""A layer's graphs in training, one unit per block: below the active block, the active one, above it."""
EVALUATION_STATES = 2
"""A layer's graphs in validation: its parameters frozen or trainable (validation runs with any block active)."""


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


class GraphsPerCycle(Callback):
    """Dynamo's graph count at the end of every HiFT cycle."""

    def __init__(self, units: int) -> None:
        self.units = units
        self.counts: list[int] = []

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step % self.units == 0:
            self.counts.append(graphs())


class ForwardModule(TinyModule):
    """Calls its own ``forward`` in its steps, so that ``module.compile()`` reaches the layers; validates too."""

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, labels = batch
        return nn.functional.cross_entropy(self(tokens), labels)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        tokens, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self(tokens), labels))

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


class CompiledStack(TinyMLPStack):
    """A stack whose ``forward`` is compiled by a decorator on the class."""

    forward = torch.compile(TinyMLPStack.forward, backend="eager")


def whole_module(module: TinyModule, backend: str = "eager") -> Any:
    return torch.compile(module, backend=backend)  # what the user passes to trainer.fit


def wrapped_inner(module: TinyModule, backend: str = "eager") -> Any:
    module.net = torch.compile(module.net, backend=backend)  # type: ignore[assignment]
    return module


def inner_in_place(module: TinyModule, backend: str = "eager") -> Any:
    module.net.compile(backend=backend)
    return module


def module_in_place(module: TinyModule, backend: str = "eager") -> Any:
    module.compile(backend=backend)
    return module


def decorated_class(module: TinyModule, backend: str = "eager") -> Any:
    module.net.__class__ = CompiledStack  # the same weights, under a class whose forward is compiled
    return module


def lightning_unwraps(model: Any) -> ForwardModule:
    """What ``trainer.fit`` does with a compiled LightningModule before the strategy sees it."""
    if isinstance(model, torch._dynamo.OptimizedModule):
        return pl.utilities.compile.from_compiled(model)  # type: ignore[no-any-return]
    return model  # type: ignore[no-any-return]


PATTERNS: dict[str, Callable[..., Any]] = {
    "trainer.fit(torch.compile(model))": whole_module,
    "self.net = torch.compile(self.net)": wrapped_inner,
    "self.net.compile()": inner_in_place,
    "model.compile()": module_in_place,
    "@torch.compile def forward": decorated_class,
}


def compiled_calls(module: nn.Module) -> dict[tuple[str, str], object]:
    """Every compiled call the modules hold of their own (instance attributes), by module and attribute name."""
    return {
        (name, attribute): vars(sub)[attribute]
        for name, sub in module.named_modules()
        for attribute in COMPILED_ATTRIBUTES
        if vars(sub).get(attribute) is not None
    }


@pytest.mark.integration
@pytest.mark.parametrize("compile_model", PATTERNS.values(), ids=PATTERNS.keys())
def test_each_way_of_compiling_becomes_one_region_per_layer_and_comes_back(compile_model: Callable[..., Any]) -> None:
    module = lightning_unwraps(compile_model(ForwardModule(num_layers=LAYERS)))
    before = compiled_calls(module)
    tokens = torch.randint(0, 8, (2, 3))

    compiled = compile_by_unit(module)
    assert compiled is not None
    assert compiled.units == [name for name, _ in module.named_modules() if name.rpartition(".")[0].endswith("layers")]
    module(tokens)
    assert graphs() == LAYERS  # one per layer, none for the whole model

    compiled.restore()
    assert compiled_calls(module) == before
    module(tokens)
    assert graphs() == LAYERS + 1  # the user's own graph of the whole model, as without HiFT


def test_an_uncompiled_model_or_one_compiled_layer_by_layer_is_left_alone() -> None:
    module = ForwardModule(num_layers=LAYERS)
    assert compile_by_unit(module) is None
    module.forward = torch.compiler.disable(module.forward)  # type: ignore[method-assign]  # marked, not compiled
    assert compile_by_unit(module) is None
    for index, layer in enumerate(module.net.layers):
        module.net.layers[index] = torch.compile(layer, backend="eager")  # already a region per layer
    assert compile_by_unit(module) is None
    module.compile(backend="eager")  # the whole model too: it runs eagerly, the layers stay as they were compiled
    compiled = compile_by_unit(module)
    assert compiled is not None and compiled.units == [] and module._compiled_call_impl is None


def train(
    compile_model: Callable[[TinyModule], Any] | None, layers: int = LAYERS, validate: bool = True
) -> tuple[TinyModule, Any, list[int]]:
    """Fit for ``CYCLES`` cycles, validating at every step; returns the module, strategy and graphs after each cycle."""
    torch.manual_seed(0)
    module = ForwardModule(num_layers=layers)
    strategy, graphs_per_cycle = HiFTStrategy(), GraphsPerCycle(units=layers + 2)
    model = compile_model(module) if compile_model else module
    validation = {"val_check_interval": 1, "limit_val_batches": 1} if validate else {"limit_val_batches": 0}
    fit(model, strategy, max_steps=CYCLES * (layers + 2), callbacks=[graphs_per_cycle], **validation)
    return module, strategy, graphs_per_cycle.counts


def assert_same_weights(module: nn.Module, expected: nn.Module, tolerance: float) -> None:
    for (name, p), e in zip(module.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, e, rtol=tolerance, atol=tolerance / 10, msg=name)


@pytest.mark.integration
def test_a_compiled_model_compiles_each_layer_a_few_times_and_trains_as_uncompiled() -> None:
    eager, _, _ = train(None)
    module, strategy, counts = train(lambda module: whole_module(module, backend="aot_eager"))

    assert counts[0] <= (TRAINING_STATES + EVALUATION_STATES) * LAYERS  # a few per layer, however many blocks
    assert counts[1:] == [counts[0]] * (CYCLES - 1), "a later cycle compiled again"
    assert len(strategy.compiled_by_unit.units) == LAYERS
    assert_same_weights(module, eager, tolerance=1e-5)
    # After the fit the module is compiled as Lightning left it, for trainer.validate / test / predict.
    assert module._compiler_ctx is not None and "training_step" in vars(module)
    assert not any("_compiled_call_impl" in vars(layer) for layer in module.net.layers)


class IndexedLayer(nn.Module):
    """A layer that knows its depth, as Hugging Face's do (``layer_idx``): dynamo specialises each layer on it."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + torch.tanh(self.linear(hidden)) / (1 + self.layer_idx)


@pytest.mark.integration
def test_each_layer_counts_its_graphs_against_its_own_recompile_limit() -> None:
    layers = nn.ModuleList(IndexedLayer(index) for index in range(LAYERS))
    model = nn.Sequential(*layers)
    model.compile(backend="eager")
    compiled = compile_by_unit(model, layers=lambda _: list(layers))
    assert compiled is not None
    for active in range(LAYERS):  # a cycle of HiFT, by hand: 8 layers x 3 states is more than 8 graphs
        for index, layer in enumerate(layers):
            layer.requires_grad_(index == active)
        model(torch.randn(2, WIDTH)).sum().backward()
    assert graphs() == TRAINING_STATES * LAYERS - 2  # the first layer never sees an input that requires grad


@pytest.mark.slow  # inductor generates and builds C++ for each graph: about 30 s on two busy cores, once per cache
def test_inductor_the_default_backend() -> None:
    eager, _, _ = train(None, layers=2, validate=False)
    module, _, counts = train(torch.compile, layers=2, validate=False)
    assert counts == [TRAINING_STATES * 2] * CYCLES
    assert_same_weights(module, eager, tolerance=1e-4)

"""find_units: the family table, the generic fallback, the ``layers=`` override and their errors."""

from __future__ import annotations

from typing import Any

import pytest
from lightning.pytorch import LightningModule
from torch import nn

from lightning_hift.errors import HiFTConfigError
from lightning_hift.units import EMBEDDINGS, FAMILIES, OUTPUT, Unit, find_units
from tests.helpers.tiny_models import TINY_MODELS, TinyMLPStack


class Wrapper(nn.Module):
    """A user module holding another model as ``self.model``, like a LightningModule does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class HFLightningModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = TINY_MODELS["llama-lm"]()


def _layer_count(model: nn.Module) -> int:
    config: Any = model.config
    decoder_layers = config.num_decoder_layers if config.model_type == "t5" and hasattr(model, "decoder") else 0
    return int(config.num_hidden_layers) + decoder_layers


def _unit(units: list[Unit], name: str) -> Unit:
    return next(unit for unit in units if unit.name == name)


def _names(units: list[Unit]) -> list[str]:
    return [unit.name for unit in units]


@pytest.mark.parametrize("key", list(TINY_MODELS))
def test_every_parameter_is_in_exactly_one_unit(key: str) -> None:
    model = TINY_MODELS[key]()
    names = [name for unit in find_units(model) for name in unit.param_names]
    assert len(names) == len(set(names))
    # Sorted: OPT and XLM-R register output-side modules before their layers.
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())


@pytest.mark.parametrize("key", list(TINY_MODELS))
def test_units_run_embeddings_then_layers_by_depth_then_output(key: str) -> None:
    model = TINY_MODELS[key]()
    units = _names(find_units(model))
    layers = units[1:-1]
    assert (units[0], units[-1]) == (EMBEDDINGS, OUTPUT)
    assert len(layers) == _layer_count(model)
    # Within each stack the index grows; encoder stacks come before decoder stacks.
    stacks = [layer.rsplit(".", 1) for layer in layers]
    assert stacks == sorted(stacks, key=lambda stack: ("decoder" in stack[0], int(stack[1])))


def test_every_family_in_the_table_has_a_tiny_model() -> None:
    covered = {TINY_MODELS[key]().config.model_type for key in TINY_MODELS}  # type: ignore[union-attr]
    assert set(FAMILIES) <= covered


def test_t5_encoder_final_norm_ends_the_encoder_and_decoder_norm_is_output() -> None:
    units = find_units(TINY_MODELS["t5"]())
    assert "encoder.final_layer_norm.weight" in _unit(units, "encoder.block.1").param_names
    assert _unit(units, OUTPUT).param_names == ("decoder.final_layer_norm.weight",)
    assert _unit(units, EMBEDDINGS).param_names == ("shared.weight",)


def test_opt_norm_and_projection_registered_before_the_layers_go_to_output() -> None:
    units = find_units(TINY_MODELS["opt-lm"]())
    assert set(_unit(units, OUTPUT).param_names) == {
        "model.decoder.project_out.weight",
        "model.decoder.final_layer_norm.weight",
        "model.decoder.final_layer_norm.bias",
    }
    assert "model.decoder.project_in.weight" in _unit(units, EMBEDDINGS).param_names


def test_a_task_head_registered_before_the_base_model_goes_to_output() -> None:
    units = find_units(TINY_MODELS["xlm-roberta-seqcls"]())
    assert all(name.startswith("classifier.") for name in _unit(units, OUTPUT).param_names)
    assert not any(name.startswith("classifier.") for name in _unit(units, EMBEDDINGS).param_names)


@pytest.mark.parametrize(("key", "in_output"), [("llama-lm", True), ("llama-lm-tied", False)])
def test_tied_lm_head_is_listed_once_as_the_embedding(key: str, in_output: bool) -> None:
    units = find_units(TINY_MODELS[key]())
    assert _unit(units, EMBEDDINGS).param_names == ("model.embed_tokens.weight",)
    assert ("lm_head.weight" in _unit(units, OUTPUT).param_names) is in_output


def test_hf_model_inside_a_lightning_module_uses_the_table() -> None:
    units = find_units(HFLightningModule())
    assert _names(units)[1:4] == ["model.model.layers.0", "model.model.layers.1", "model.model.layers.2"]
    assert _unit(units, OUTPUT).param_names == ("model.model.norm.weight", "model.lm_head.weight")


def test_the_table_wins_over_a_larger_repeated_list_outside_the_hf_model() -> None:
    model = Wrapper(TINY_MODELS["llama-lm"]())
    model.big = nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 64)])
    units = find_units(model)
    assert _names(units)[1:-1] == ["model.model.layers.0", "model.model.layers.1", "model.model.layers.2"]
    assert "big.0.weight" in _unit(units, OUTPUT).param_names


@pytest.mark.parametrize("tie_head", [False, True])
def test_generic_fallback_finds_the_repeated_layers(tie_head: bool) -> None:
    units = find_units(TinyMLPStack(num_layers=3, tie_head=tie_head))
    assert _names(units) == [EMBEDDINGS, "layers.0", "layers.1", "layers.2", OUTPUT]
    assert _unit(units, EMBEDDINGS).param_names == ("embed.weight",)
    expected_output = ("norm.weight", "norm.bias") + (() if tie_head else ("head.weight",))
    assert _unit(units, OUTPUT).param_names == expected_output


def test_generic_fallback_inside_a_wrapper_ignores_nested_lists_and_small_lists() -> None:
    model = Wrapper(TinyMLPStack(num_layers=2))
    model.adapters = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])  # repeated, but far smaller
    units = find_units(model)
    assert _names(units) == [EMBEDDINGS, "model.layers.0", "model.layers.1", OUTPUT]
    assert _unit(units, OUTPUT).param_names[-2:] == ("adapters.1.weight", "adapters.1.bias")


def test_generic_fallback_keeps_both_stacks_of_an_encoder_decoder() -> None:
    model = Wrapper(TinyMLPStack(num_layers=2))
    model.decoder = TinyMLPStack(num_layers=3)
    units = _names(find_units(model))
    assert units == [EMBEDDINGS, "model.layers.0", "model.layers.1", *[f"decoder.layers.{i}" for i in range(3)], OUTPUT]


@pytest.mark.parametrize("path", ["model.layers", "layers"])
def test_layers_override_by_exact_path_or_suffix(path: str) -> None:
    model = Wrapper(TinyMLPStack(num_layers=2))
    assert _names(find_units(model, layers=path)) == [EMBEDDINGS, "model.layers.0", "model.layers.1", OUTPUT]


def test_layers_override_suffix_reaches_into_an_hf_model() -> None:
    units = _names(find_units(Wrapper(TINY_MODELS["llama-lm"]()), layers="model.layers"))
    assert units[1] == "model.model.layers.0"


def test_layers_override_by_list_sets_the_depth_order() -> None:
    units = _names(find_units(TINY_MODELS["t5"](), layers=["decoder.block", "encoder.block"]))
    assert units[1:3] == ["decoder.block.0", "decoder.block.1"]
    assert units[4:6] == ["encoder.block.0", "encoder.block.1"]


def _second_layer_and_norm(model: nn.Module) -> list[nn.Module]:
    assert isinstance(model, TinyMLPStack)
    return [model.layers[1], model.norm]


def test_layers_override_by_callable() -> None:
    units = find_units(TinyMLPStack(num_layers=3), layers=_second_layer_and_norm)
    assert _names(units) == [EMBEDDINGS, "layers.1", "norm", OUTPUT]
    assert "layers.0.up.weight" in _unit(units, EMBEDDINGS).param_names
    # A loose parameter after a layer (in registration order) joins that layer.
    assert "layers.2.up.weight" in _unit(units, "layers.1").param_names


def _two_stacks() -> nn.Module:
    model = Wrapper(TinyMLPStack())
    model.other = TinyMLPStack()
    return model


@pytest.mark.parametrize(
    ("build", "layers", "message"),
    [
        (TinyMLPStack, "model.blocks", "names no submodule"),
        (TinyMLPStack, "norm", "not a non-empty nn.ModuleList"),
        (_two_stacks, "layers", "ambiguous"),
        (TinyMLPStack, [], "non-empty list"),
        (TinyMLPStack, ["layers", "layers"], "more than once"),
        (TinyMLPStack, lambda model: [model.layers, model.layers[0]], "inside"),
        (TinyMLPStack, lambda model: [nn.Linear(2, 2)], "not a submodule"),
        (TinyMLPStack, lambda model: [], "no modules"),
        (TinyMLPStack, nn.ModuleList(), "dotted path"),
    ],
)
def test_layers_override_errors_name_the_argument(build: type[nn.Module], layers: object, message: str) -> None:
    with pytest.raises(HiFTConfigError, match=message) as error:
        find_units(build(), layers=layers)  # type: ignore[arg-type]
    assert "layers=" in str(error.value)


def test_missing_path_error_lists_candidate_layer_lists() -> None:
    with pytest.raises(HiFTConfigError, match=r"layers='decoder\.layers'.*'model\.layers'"):
        find_units(Wrapper(TinyMLPStack()), layers="decoder.layers")


@pytest.mark.parametrize(
    "model",
    [nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.ModuleList([nn.ReLU(), nn.ReLU()])],
)
def test_model_without_repeated_layers_asks_for_the_layers_argument(model: nn.Module) -> None:
    with pytest.raises(HiFTConfigError, match=r"no repeated layers.*layers="):
        find_units(model)

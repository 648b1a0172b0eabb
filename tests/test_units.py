"""find_units: the family table, the generic fallback, the last-resort cut, the ``layers=`` override and errors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from lightning_hift.errors import HiFTConfigError
from lightning_hift.units import EMBEDDINGS, FAMILIES, OUTPUT, Unit, check_layers_spec, find_units
from tests.helpers.plain_models import PLAIN_MODELS
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
    if config.model_type == "albert":
        # Every depth applies one of the shared layer groups: a unit per group, not per depth.
        return int(config.num_hidden_groups)
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


def _fallback_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "lightning_hift" and record.levelno == logging.INFO and "no repeated layers" in record.msg
    ]


@pytest.mark.parametrize("key", list(PLAIN_MODELS))
def test_last_resort_cuts_a_plain_model_by_module_in_registration_order(
    key: str, caplog: pytest.LogCaptureFixture
) -> None:
    build, expected = PLAIN_MODELS[key]
    model = build()
    caplog.set_level(logging.INFO, logger="lightning_hift")
    units = find_units(model)
    assert _names(units) == expected
    params = dict(model.named_parameters())
    names = [name for unit in units for name in unit.param_names]
    assert sorted(names) == sorted(params)
    assert len(names) == len(set(names))
    # No unit is a lone norm, BatchNorm or bias: each holds a matrix (or a convolution kernel).
    assert all(any(params[name].dim() >= 2 for name in unit.param_names) for unit in units)
    assert len(_fallback_lines(caplog)) == 1


def test_last_resort_merges_a_norm_into_the_unit_before_it_and_a_leading_one_into_the_next() -> None:
    cnn = find_units(PLAIN_MODELS["cnn-batchnorm"][0]())
    assert _unit(cnn, "net.0").param_names == ("net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias")
    norm_first = find_units(PLAIN_MODELS["norm-first"][0]())
    assert _unit(norm_first, "net.1").param_names == ("net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias")


def test_last_resort_merges_a_tiny_embedding_into_its_neighbour() -> None:
    units = find_units(PLAIN_MODELS["tiny-token-types"][0]())
    assert _unit(units, "words").param_names == ("words.weight", "token_types.weight")


def test_last_resort_lists_a_shared_module_and_a_tied_weight_once() -> None:
    shared = find_units(PLAIN_MODELS["shared-block"][0]())
    assert not any("block_again" in name for unit in shared for name in unit.param_names)
    tied = find_units(PLAIN_MODELS["tied-head"][0]())
    assert _unit(tied, "embed").param_names == ("embed.weight",)
    assert "head.weight" not in [name for unit in tied for name in unit.param_names]


def test_last_resort_of_light_modules_only_is_one_unit() -> None:
    units = find_units(nn.Sequential(nn.LayerNorm(4), nn.BatchNorm1d(4)))
    assert units == [Unit("0", ("0.weight", "0.bias", "1.weight", "1.bias"))]


def test_repeated_lists_without_parameters_are_not_layers() -> None:
    model = Wrapper(nn.Linear(4, 4))
    model.activations = nn.ModuleList([nn.ReLU(), nn.ReLU()])
    assert _names(find_units(model)) == ["model"]


def test_fallback_log_line_names_the_model_the_unit_count_and_the_override(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lightning_hift")
    find_units(PLAIN_MODELS["autoencoder"][0]())
    [line] = _fallback_lines(caplog)
    assert "LitAutoEncoder" in line
    assert "4 units" in line
    assert "layers='dotted.path'" in line
    assert "callable" in line


@pytest.mark.parametrize("key", ["llama-lm", "albert-seqcls"])
def test_table_and_generic_cuts_log_no_fallback(key: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lightning_hift")
    find_units(TINY_MODELS[key]())
    find_units(TinyMLPStack())
    assert _fallback_lines(caplog) == []


@pytest.mark.parametrize("key", ["albert", "albert-seqcls"])
def test_albert_shared_layer_group_is_one_unit_between_embeddings_and_output(key: str) -> None:
    model = TINY_MODELS[key]()
    prefix = "albert." if key == "albert-seqcls" else ""
    units = find_units(model)
    assert _names(units) == [EMBEDDINGS, f"{prefix}encoder.albert_layer_groups.0", OUTPUT]
    assert f"{prefix}encoder.embedding_hidden_mapping_in.weight" in _unit(units, EMBEDDINGS).param_names
    head = ("classifier.weight", "classifier.bias") if prefix else ()
    assert _unit(units, OUTPUT).param_names == (f"{prefix}pooler.weight", f"{prefix}pooler.bias", *head)


@pytest.mark.parametrize("model", [nn.ReLU(), nn.ModuleList([nn.ReLU(), nn.ReLU()]), nn.Sequential(nn.Flatten())])
def test_model_without_parameters_is_refused(model: nn.Module) -> None:
    with pytest.raises(HiFTConfigError, match=r"has no parameters.*register"):
        find_units(model)


def _no_layers(model: nn.Module) -> list[nn.Module]:
    return []


@pytest.mark.parametrize("layers", [None, "model.layers", ["encoder.block", "decoder.block"], ("layers",), _no_layers])
def test_check_layers_spec_accepts_paths_lists_and_callables(layers: Any) -> None:
    check_layers_spec(layers)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (123, r"dotted path.*got 123 \(int\)"),
        (1.5, r"dotted path.*got 1\.5 \(float\)"),
        ({"model": "layers"}, r"dotted path.*\(dict\)"),
        (["layers", 3], r"lists 3 \(int\).*dotted path string"),
        ([0], r"lists 0 \(int\)"),
        (["layers", None], r"lists None \(NoneType\)"),
        ([], "non-empty list"),
        (nn.ModuleList(), "dotted path"),
    ],
)
@pytest.mark.parametrize("check", [check_layers_spec, lambda layers: find_units(TinyMLPStack(), layers)])
def test_layers_of_a_wrong_type_raise_a_config_error_saying_what_to_pass(
    layers: object, message: str, check: Callable[[Any], object]
) -> None:
    with pytest.raises(HiFTConfigError, match=message) as error:
        check(layers)
    assert "layers=" in str(error.value)


def test_a_hugging_face_model_wrapped_by_torch_compile_is_cut_as_the_model_inside() -> None:
    class Holder(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

    model = TINY_MODELS["llama-lm"]()
    plain = [unit.name for unit in find_units(Holder(model))]
    compiled = [unit.name.replace("._orig_mod", "") for unit in find_units(Holder(torch.compile(model)))]
    assert compiled == plain
    assert plain[0] == "embeddings" and plain[-1] == "output"

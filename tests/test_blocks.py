"""partition: the invariant over every tiny family, grouping, frozen parameters and the errors."""

from __future__ import annotations

import doctest
from typing import Any

import pytest
from torch import nn

from lightning_hift import blocks as blocks_module
from lightning_hift.blocks import Block, check_frozen, describe_partition, partition
from lightning_hift.errors import HiFTConfigError
from tests.helpers.plain_models import PLAIN_MODELS, TiedHead
from tests.helpers.tiny_models import TINY_MODELS, TinyMLPStack


def _scheduled(blocks: list[Block]) -> list[nn.Parameter]:
    return [param for block in blocks for param in block.params]


@pytest.mark.parametrize("key", list(TINY_MODELS))
@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_every_trainable_parameter_is_in_exactly_one_block(key: str, layers_per_block: int) -> None:
    model = TINY_MODELS[key]()
    blocks = partition(model, layers_per_block)
    scheduled = [id(param) for param in _scheduled(blocks)]
    # Identity, not names: a tied weight (GPT-2 / tied Llama lm_head, BERT MLM decoder) must appear once.
    assert len(scheduled) == len(set(scheduled))
    assert set(scheduled) == {id(param) for param in model.parameters() if param.requires_grad}
    assert [block.index for block in blocks] == list(range(len(blocks)))
    named = dict(model.named_parameters())
    assert all(named[name] is param for block in blocks for name, param in zip(block.names, block.params, strict=True))


@pytest.mark.parametrize(
    ("layers_per_block", "sizes"), [(3, [3, 3, 2]), (1, [1] * 8), (8, [8]), (100, [8]), (5, [5, 3])]
)
def test_blocks_take_m_consecutive_units_and_the_last_one_the_rest(layers_per_block: int, sizes: list[int]) -> None:
    blocks = partition(TinyMLPStack(num_layers=6), layers_per_block)
    assert [len(block.unit_names) for block in blocks] == sizes
    units = [unit for block in blocks for unit in block.unit_names]
    assert units == ["embeddings", *[f"layers.{i}" for i in range(6)], "output"]


def test_frozen_patterns_and_user_frozen_parameters_are_never_scheduled() -> None:
    model = TinyMLPStack(num_layers=3)
    model.embed.weight.requires_grad_(False)
    blocks = partition(model, frozen=("layers.0.*", "*.norm.bias"))
    names = [name for block in blocks for name in block.names]
    assert [block.unit_names for block in blocks] == [("layers.1",), ("layers.2",), ("output",)]
    assert not any(name.startswith(("embed.", "layers.0.")) or name.endswith(".norm.bias") for name in names)
    assert "norm.bias" in names  # the final norm's name has no leading dot, so the pattern leaves it alone


@pytest.mark.parametrize("key", list(PLAIN_MODELS))
@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_plain_models_partition_every_trainable_parameter_once(key: str, layers_per_block: int) -> None:
    build, units = PLAIN_MODELS[key]
    model = build()
    blocks = partition(model, layers_per_block)
    scheduled = [id(param) for param in _scheduled(blocks)]
    assert len(scheduled) == len(set(scheduled))
    assert set(scheduled) == {id(param) for param in model.parameters() if param.requires_grad}
    assert [name for block in blocks for name in block.unit_names] == units
    assert all(len(block.unit_names) == layers_per_block for block in blocks[:-1])
    # No block is only norms, BatchNorm or biases.
    assert all(any(param.dim() >= 2 for param in block.params) for block in blocks)


@pytest.mark.parametrize(
    ("key", "pattern", "tied_to"),
    [
        ("llama-lm-tied", "*lm_head*", "model.embed_tokens.weight"),
        ("gpt2-lm", "lm_head.weight", "transformer.wte.weight"),
    ],
)
def test_a_frozen_pattern_names_a_tied_weight_by_any_of_its_names(key: str, pattern: str, tied_to: str) -> None:
    model = TINY_MODELS[key]()
    blocks = partition(model, frozen=[pattern])
    names = [name for block in blocks for name in block.names]
    assert tied_to not in names
    assert len(names) == len(dict(model.named_parameters())) - 1


def test_a_frozen_pattern_names_a_plain_models_tied_head() -> None:
    model = TiedHead()
    blocks = partition(model, frozen=["head.weight"])
    assert [block.unit_names for block in blocks] == [("mix",)]
    assert all(param is not model.embed.weight for param in blocks[0].params)


def test_frozen_none_freezes_nothing() -> None:
    model = TinyMLPStack(num_layers=2)
    assert len(_scheduled(partition(model, frozen=None))) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("frozen", "expected"), [(None, ()), ((), ()), (["a.*", "b"], ("a.*", "b")), (("a.*",), ("a.*",))]
)
def test_check_frozen_returns_the_patterns_as_a_tuple(frozen: Any, expected: tuple[str, ...]) -> None:
    assert check_frozen(frozen) == expected


@pytest.mark.parametrize(
    ("frozen", "message"),
    [
        ("model.embed_tokens.*", r"single string; pass a list of patterns: frozen=\['model\.embed_tokens\.\*'\]"),
        (123, r"frozen= must be a list of fnmatch patterns.*got 123 \(int\)"),
        ({"embed.*"}, r"frozen= must be a list of fnmatch patterns.*\(set\)"),
        ([123], r"frozen= lists 123 \(int\); every entry must be a pattern string"),
        (["embed.*", None], r"frozen= lists None \(NoneType\)"),
        ([0], r"frozen= lists 0 \(int\)"),
    ],
)
@pytest.mark.parametrize("check", [check_frozen, lambda frozen: partition(TinyMLPStack(), frozen=frozen)])
def test_frozen_of_a_wrong_type_raises_a_config_error_saying_what_to_pass(
    frozen: object, message: str, check: Any
) -> None:
    with pytest.raises(HiFTConfigError, match=message):
        check(frozen)


def test_block_numel_and_description() -> None:
    blocks = partition(TinyMLPStack(num_layers=2), layers_per_block=2)
    assert sum(block.numel() for block in blocks) == sum(
        param.numel() for param in TinyMLPStack(num_layers=2).parameters()
    )
    rows = describe_partition(blocks).splitlines()
    assert len(rows) == 1 + len(blocks)
    assert rows[1].split() == ["0", f"{blocks[0].numel():,}", "embeddings", "..", "layers.0", "(2)"]
    assert rows[2].split()[2:] == ["layers.1", "..", "output", "(2)"]


def test_docstring_example_runs() -> None:
    assert doctest.testmod(blocks_module).failed == 0


@pytest.mark.parametrize("layers_per_block", [0, -1, 1.5, True, "2", None])
def test_layers_per_block_must_be_a_positive_int(layers_per_block: object) -> None:
    with pytest.raises(HiFTConfigError, match="layers_per_block"):
        partition(TinyMLPStack(), layers_per_block)  # type: ignore[arg-type]


def test_a_frozen_pattern_that_matches_nothing_is_reported_as_a_likely_typo() -> None:
    with pytest.raises(HiFTConfigError, match=r"frozen= pattern 'embed_tokens\*'.*typo.*'embed\.weight'"):
        partition(TinyMLPStack(), frozen=("layers.*", "embed_tokens*"))


def test_everything_frozen_by_patterns_names_the_patterns() -> None:
    with pytest.raises(HiFTConfigError, match=r"frozen= patterns \['\*'\]"):
        partition(TinyMLPStack(), frozen=("*",))


def test_everything_frozen_by_requires_grad_says_so() -> None:
    model = TinyMLPStack().requires_grad_(False)
    with pytest.raises(HiFTConfigError, match="requires_grad=False"):
        partition(model)


def test_layers_errors_pass_through() -> None:
    with pytest.raises(HiFTConfigError, match="layers="):
        partition(TinyMLPStack(), layers="missing")

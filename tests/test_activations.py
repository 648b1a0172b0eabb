"""The planner's activation bytes, traced on fake tensors, against what autograd saves on the real CPU forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_hift.blocks import partition
from lightning_hift.errors import HiFTConfigError
from lightning_hift.memory.activations import activation_bytes, hf_batch, measure_saved_bytes
from tests.helpers.tiny_models import TINY_MODELS, VOCAB, TinyMLPStack

TOLERANCE = 0.02
UNTRACEABLE = {"deberta-v2-seqcls": "nonzero"}
"""Models whose forward reads values (a data-dependent shape): the planner refuses them with a message."""


def _tiny(name: str) -> nn.Module:
    model = TINY_MODELS[name]()
    config = getattr(model, "config", None)
    if config is not None:  # what real checkpoints' configs carry and the tiny ones leave out
        config.pad_token_id = 0 if config.pad_token_id is None else config.pad_token_id
        if name.startswith("t5"):
            config.decoder_start_token_id = 0
    return model


def _real_batch(model: nn.Module, batch_size: int = 2, seq_len: int = 24) -> dict[str, torch.Tensor]:
    spec = hf_batch(model, batch_size, seq_len)
    generator = torch.Generator().manual_seed(0)
    high = {"labels": 2} if spec.get("labels", torch.empty(0, 0)).dim() == 1 else {}
    return {key: torch.randint(0, high.get(key, VOCAB), t.shape, generator=generator) for key, t in spec.items()}


def _measured(
    model: nn.Module, batch: Any, sets: list[list[nn.Parameter]], precision: str, loss_fn: Any = None
) -> list[int]:
    """The real forward once per set, with only that set requiring grad."""
    figures = []
    for group in sets:
        ids = {id(p) for p in group}
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        figures.append(measure_saved_bytes(model, batch, precision, loss_fn))
    for p in model.parameters():
        p.requires_grad_(True)
    return figures


def _checkpointing(model: nn.Module, mode: bool | str) -> None:
    if mode:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
        if mode == "reentrant":
            model.enable_input_require_grads()


def _compare(model: nn.Module, batch: Any, precision: str, mode: bool | str = False, loss_fn: Any = None) -> None:
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
        if not isinstance(batch, dict):
            batch = tuple(t.to(torch.bfloat16) for t in batch)
    sets = [list(model.parameters())] + [block.params for block in partition(model, 1)]
    predicted = activation_bytes(model, batch, sets, precision, mode, loss_fn)
    model.train()
    _checkpointing(model, mode)
    measured = _measured(model, batch, sets, precision, loss_fn)
    assert measured[0] > 0
    # A causal mask that the real forward skips when it sees no padding is counted when traced without data (its
    # values unknown), as for a padded batch: bool, batch x seq x seq, at most.
    mask = batch["input_ids"].numel() * batch["input_ids"].shape[-1] if isinstance(batch, dict) else 0
    for which, (p, m) in enumerate(zip(predicted, measured, strict=True)):
        assert abs(p - m) <= TOLERANCE * m or 0 <= p - m <= mask, (which, p, m)


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(set(TINY_MODELS) - set(UNTRACEABLE)))
def test_every_tiny_model_full_fine_tuning_and_each_block_within_two_percent(name: str) -> None:
    torch.manual_seed(0)
    model = _tiny(name)
    _compare(model, _real_batch(model), "32-true")


@pytest.mark.parametrize("name", sorted(UNTRACEABLE))
def test_a_forward_that_reads_values_is_refused_with_a_message(name: str) -> None:
    model = _tiny(name)
    with pytest.raises(HiFTConfigError, match=f"{UNTRACEABLE[name]}.*measure_saved_bytes"):
        activation_bytes(model, _real_batch(model))


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("mode", [False, True, "reentrant"])
@pytest.mark.parametrize("name", ["llama-lm", "gpt2-lm", "bert-seqcls", "t5"])
def test_precisions_and_gradient_checkpointing_within_two_percent(name: str, mode: bool | str, precision: str) -> None:
    torch.manual_seed(0)
    model = _tiny(name)
    _compare(model, _real_batch(model), precision, mode)


def test_a_plain_module_with_positional_inputs_and_its_own_loss() -> None:
    torch.manual_seed(0)
    model = TinyMLPStack(vocab_size=32)
    tokens = (torch.randint(0, 32, (4, 12)),)

    def next_token_loss(logits: torch.Tensor, batch: tuple[torch.Tensor]) -> torch.Tensor:
        # Saves the fp32 log-probabilities of every position: the term that dominates a language model's total.
        return nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[0][:, 1:].flatten())

    _compare(model, tokens, "32-true", loss_fn=next_token_loss)
    _compare(model, tokens, "bf16-mixed", loss_fn=next_token_loss)
    assert activation_bytes(model, tokens, loss_fn=next_token_loss)[0] > activation_bytes(model, tokens)[0]


def test_the_planner_reads_no_weights_and_leaves_the_model_as_it_was() -> None:
    with torch.device("meta"):
        model = TINY_MODELS["llama-lm"]()
    model.eval()
    (whole,) = activation_bytes(model, hf_batch(model, 2, 24), gradient_checkpointing=True)
    assert whole > 0
    assert not model.training and not model.is_gradient_checkpointing
    assert all(p.device.type == "meta" and p.requires_grad for p in model.parameters())


def test_under_hift_a_higher_block_saves_less_than_the_lowest() -> None:
    torch.manual_seed(0)
    model = TINY_MODELS["llama-lm"]()
    blocks = partition(model, 1)
    batch = hf_batch(model, 2, 24)
    figures = activation_bytes(model, batch, [block.params for block in blocks])
    whole = activation_bytes(model, batch)[0]
    assert max(figures) <= whole
    assert figures[-2] < figures[1]  # the last layer block keeps less than the first layer's


def test_bad_arguments_are_named() -> None:
    model = TINY_MODELS["llama-lm"]()
    with pytest.raises(HiFTConfigError, match="gradient_checkpointing"):
        activation_bytes(model, hf_batch(model, 1, 8), gradient_checkpointing="yes")
    with pytest.raises(HiFTConfigError, match="seq_len"):
        hf_batch(model, 1, 0)
    with pytest.raises(HiFTConfigError, match="not a Hugging Face model"):
        hf_batch(nn.Linear(2, 2), 1, 8)
    with pytest.raises(HiFTConfigError, match=r"activation_checkpointing_enable \(gradient_checkpointing_enable"):
        activation_bytes(nn.Linear(2, 2), (torch.zeros(1, 2),), gradient_checkpointing=True)

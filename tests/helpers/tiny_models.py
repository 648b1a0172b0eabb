"""Tiny random-init models: one or more per Hugging Face family in the units table, and a plain stack.

Sizes are the smallest each config accepts (hidden 16, two heads, 2-3 layers), so building one takes
milliseconds on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as hf
from torch import Tensor, nn

VOCAB = 128
_SIZES: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 16, "num_attention_heads": 2}
_DECODER: dict[str, Any] = {**_SIZES, "intermediate_size": 32, "num_hidden_layers": 3, "num_key_value_heads": 2}
_ENCODER: dict[str, Any] = {**_SIZES, "intermediate_size": 32, "num_hidden_layers": 2}
# GPT-2 style configs default to token ids beyond a tiny vocabulary.
_GPT2: dict[str, Any] = {
    "vocab_size": VOCAB,
    "n_embd": 16,
    "n_layer": 2,
    "n_head": 2,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
_T5: dict[str, Any] = {
    "vocab_size": VOCAB,
    "d_model": 16,
    "d_kv": 8,
    "d_ff": 32,
    "num_layers": 2,
    "num_decoder_layers": 3,
}
_OPT: dict[str, Any] = {
    **_SIZES,
    "ffn_dim": 32,
    "num_hidden_layers": 2,
    "max_position_embeddings": 64,
    "word_embed_proj_dim": 8,
}

# One layer group, applied at each of the three depths.
_ALBERT: dict[str, Any] = {**_ENCODER, "embedding_size": 8, "num_hidden_layers": 3}


class TinyMLPBlock(nn.Module):
    """A pre-norm residual MLP: the repeated layer of :class:`TinyMLPStack`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.down(nn.functional.gelu(self.up(self.norm(hidden))))


class TinyMLPStack(nn.Module):
    """Embedding, ``num_layers`` identical blocks, a final norm and a head: ``num_layers + 2`` units.

    A language model (a logit per token) by default; with ``classes``, a classifier of the mean hidden state.
    """

    def __init__(
        self,
        vocab_size: int = 32,
        width: int = 8,
        num_layers: int = 4,
        tie_head: bool = False,
        classes: int | None = None,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.layers = nn.ModuleList(TinyMLPBlock(width) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.pool = classes is not None
        self.head = nn.Linear(width, classes) if classes is not None else nn.Linear(width, vocab_size, bias=False)
        if tie_head:
            # The head reuses the embedding matrix, as GPT-style models do.
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.embed(tokens)
        for layer in self.layers:
            hidden = layer(hidden)
        hidden = self.norm(hidden)
        return self.head(hidden.mean(dim=1) if self.pool else hidden)


def _llama(tie: bool) -> nn.Module:
    return hf.LlamaForCausalLM(hf.LlamaConfig(**_DECODER, tie_word_embeddings=tie))


TINY_MODELS: dict[str, Callable[[], nn.Module]] = {
    "bert": lambda: hf.BertModel(hf.BertConfig(**_ENCODER)),
    "bert-seqcls": lambda: hf.BertForSequenceClassification(hf.BertConfig(**_ENCODER)),
    "bert-mlm": lambda: hf.BertForMaskedLM(hf.BertConfig(**_ENCODER)),
    "roberta-seqcls": lambda: hf.RobertaForSequenceClassification(hf.RobertaConfig(**_ENCODER)),
    "xlm-roberta-seqcls": lambda: hf.XLMRobertaForSequenceClassification(hf.XLMRobertaConfig(**_ENCODER)),
    "xlm-roberta-mlm": lambda: hf.XLMRobertaForMaskedLM(hf.XLMRobertaConfig(**_ENCODER)),
    "electra-seqcls": lambda: hf.ElectraForSequenceClassification(hf.ElectraConfig(**_ENCODER, embedding_size=8)),
    "deberta-v2-seqcls": lambda: hf.DebertaV2ForSequenceClassification(hf.DebertaV2Config(**_ENCODER)),
    "distilbert-seqcls": lambda: hf.DistilBertForSequenceClassification(
        hf.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32)
    ),
    "gpt2": lambda: hf.GPT2Model(hf.GPT2Config(**_GPT2)),
    "gpt2-lm": lambda: hf.GPT2LMHeadModel(hf.GPT2Config(**_GPT2)),
    "gptj-lm": lambda: hf.GPTJForCausalLM(hf.GPTJConfig(**_GPT2, rotary_dim=4)),
    "bloom-lm": lambda: hf.BloomForCausalLM(hf.BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=2, n_head=2)),
    "falcon-lm": lambda: hf.FalconForCausalLM(hf.FalconConfig(**_SIZES, num_hidden_layers=2)),
    "llama": lambda: hf.LlamaModel(hf.LlamaConfig(**_DECODER)),
    "llama-lm": lambda: _llama(tie=False),
    "llama-lm-tied": lambda: _llama(tie=True),
    "llama-seqcls": lambda: hf.LlamaForSequenceClassification(hf.LlamaConfig(**_DECODER)),
    "mistral-lm": lambda: hf.MistralForCausalLM(hf.MistralConfig(**_DECODER)),
    "qwen2-lm": lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(**_DECODER)),
    "qwen3-lm": lambda: hf.Qwen3ForCausalLM(hf.Qwen3Config(**_DECODER, head_dim=8)),
    "gemma-lm": lambda: hf.GemmaForCausalLM(hf.GemmaConfig(**_DECODER, head_dim=8)),
    "phi-lm": lambda: hf.PhiForCausalLM(hf.PhiConfig(**_DECODER)),
    "gpt-neox-lm": lambda: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(**_ENCODER)),
    "opt": lambda: hf.OPTModel(hf.OPTConfig(**_OPT)),
    "opt-lm": lambda: hf.OPTForCausalLM(hf.OPTConfig(**_OPT)),
    "t5": lambda: hf.T5ForConditionalGeneration(hf.T5Config(**_T5, num_heads=2)),
    "t5-encoder": lambda: hf.T5EncoderModel(hf.T5Config(**_T5, num_heads=2)),
    "albert": lambda: hf.AlbertModel(hf.AlbertConfig(**_ALBERT)),
    "albert-seqcls": lambda: hf.AlbertForSequenceClassification(hf.AlbertConfig(**_ALBERT)),
}
"""Builders of tiny random-init Hugging Face models, base and task-head variants, keyed by a short name."""


def tiny_bert_classifier(num_labels: int = 2, num_layers: int = 2) -> hf.BertForSequenceClassification:
    """The tasks' sequence classifier at the tiny size, with seeded weights."""
    torch.manual_seed(0)
    config = hf.BertConfig(**{**_ENCODER, "num_hidden_layers": num_layers})
    config.num_labels = num_labels
    return hf.BertForSequenceClassification(config)


def tiny_llama_lm(num_layers: int = 2) -> hf.LlamaForCausalLM:
    """The tasks' causal language model at the tiny size, with seeded weights."""
    torch.manual_seed(0)
    return hf.LlamaForCausalLM(hf.LlamaConfig(**{**_DECODER, "num_hidden_layers": num_layers}))

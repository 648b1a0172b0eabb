"""A word-level tokenizer built in memory, so data tests need no download and run in milliseconds."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = ("good", "bad", "fine", "car", "road", "drive", "love", "hate", "negative", "neutral", "positive")


def word_tokenizer(words: Sequence[str] = WORDS, pad: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """One id per whitespace-separated word of ``words``; any other word is ``[UNK]``.

    Args:
        words: The vocabulary besides the special tokens.
        pad: Give it a ``[PAD]`` token; without one it looks like a causal-LM tokenizer.
        eos: Give it an ``[EOS]`` token.
    """
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "eos_token": "[EOS]"}
    if not pad:
        del specials["pad_token"]
    if not eos:
        del specials["eos_token"]
    vocab = {token: i for i, token in enumerate([*specials.values(), *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)

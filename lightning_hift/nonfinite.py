"""Which optimizer steps are applied: a step whose active block got no gradient, or gradients holding inf or NaN, is
skipped whole (``on_nonfinite="skip"``) or stops training (``"stop"``); nothing non-finite reaches the weights or the
optimizer state. Under loss scaling (``16-mixed``'s GradScaler, ``16-true``'s masters) an overflow is routine: the
scaler skips the step and lowers the scale itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_hift.blocks import Block
from lightning_hift.packages import lightning_classes
from lightning_hift.precision import MasterWeights, all_finite
from lightning_hift.settings import HiFTSettings

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy as _Strategy
else:
    _Strategy = object


class StepGuard(_Strategy):
    """Mixed into the HiFT strategies: prepares the active block's gradients for the step, or skips the step."""

    settings: HiFTSettings
    masters: MasterWeights | None
    skipped_nonfinite: int
    """Steps skipped for non-finite gradients (``on_nonfinite="skip"``) in the current fit."""
    _warned_no_grad: set[int]

    def _grads_ready(self, block: Block, lightning_skipped: bool) -> bool:
        """Prepare the block's gradients for its update; False when the step must be skipped."""
        self._reduce_grads(block)  # every process takes part, whether or not it received gradients itself
        if all(p.grad is None for p in block.params):
            if not lightning_skipped:  # a training_step that returns None is Lightning's own way to skip
                self._warn_no_grad(block)
            return False
        grads = [p.grad for p in block.params if p.grad is not None]
        if self._checks_nonfinite() and not self._all_finite(grads):
            self._on_nonfinite(block)
            for p in block.params:
                p.grad = None
            return False
        return self.masters is None or self.masters.grads_to_masters(block)

    def _another_pass(self, closure: Callable[[], Any], block: Block, call: int) -> Any:
        """A later call of the closure within one optimizer step (SAM's second pass, say).

        The optimizer may have moved the tensors it steps since the last pass (SAM's ascent), so the forward runs on
        them, and it receives this pass's gradients on those tensors (the fp32 masters under half precision),
        combined across processes, as it would without HiFT. The step cannot be skipped any more (the optimizer has
        changed the weights already): a fp16 overflow makes the pass again at a lower loss scale, and gradients
        that are not finite at any scale stop training.
        """
        masters = self.masters
        while True:
            if masters is not None:
                masters.sync_weights(block)
            loss = closure()
            self._reduce_grads(block)
            grads = [p.grad for p in block.params if p.grad is not None]
            finite = not grads or not self._checks_nonfinite() or self._all_finite(grads)
            if finite and (masters is None or masters.add_pass_grads(block)):
                return loss
            if masters is None or not masters.lower_scale():
                raise FloatingPointError(
                    f"HiFT: non-finite gradients in {self._where(block)}, in call {call} of the optimizer's closure."
                    " The optimizer had already changed the weights in an earlier call of this step (a"
                    " sharpness-aware ascent, say), so the step cannot be skipped and training stops; checkpoints"
                    " written so far are intact. Lower the learning rate (or the optimizer's perturbation size), or"
                    " clip gradients (gradient_clip_val=...)."
                )

    def _reduce_grads(self, block: Block) -> None:
        """Combine the block's gradients across processes before the step; one process has nothing to do.

        Afterwards a parameter has a gradient if any process gave it one.
        """

    def _all_finite(self, grads: list[Tensor]) -> bool:
        """Whether the gradients the step would apply are finite. Processes holding whole gradients (after their
        all-reduce) reach the same verdict on their own."""
        return all_finite(grads)

    def _checks_nonfinite(self) -> bool:
        # With loss scaling, an overflow is routine: the scaler skips the step and lowers the scale itself.
        mixed = isinstance(self.precision_plugin, lightning_classes("plugins.precision.MixedPrecision"))
        amp_scaler = mixed and getattr(self.precision_plugin, "scaler", None) is not None
        return not amp_scaler and (self.masters is None or self.masters.scaler is None)

    def _on_nonfinite(self, block: Block) -> None:
        self.skipped_nonfinite += 1
        where = self._where(block)
        if self.settings.on_nonfinite == "stop":
            raise FloatingPointError(
                f"HiFT: non-finite gradients in {where}; nothing was updated, so the last checkpoint and the"
                " weights are intact. Lower the learning rate, clip gradients (gradient_clip_val=...), or pass"
                " on_nonfinite='skip' to skip such steps."
            )
        if self.skipped_nonfinite == 1:
            rank_zero_warn(
                f"HiFT: non-finite gradients in {where}; the step was skipped (nothing was updated). Later"
                " skips are counted in `strategy.skipped_nonfinite`; pass on_nonfinite='stop' to stop instead."
            )

    def _warn_no_grad(self, block: Block) -> None:
        if block.index in self._warned_no_grad:
            return
        self._warned_no_grad.add(block.index)
        rank_zero_warn(
            f"HiFT: block {block.index} ({', '.join(block.unit_names)}) received no gradient, so its step was"
            " skipped. If those parameters do not contribute to the loss, freeze them with `frozen=`."
        )

    def _where(self, block: Block) -> str:
        assert self.lightning_module is not None
        step = self.lightning_module.trainer.global_step
        return f"block {block.index} ({', '.join(block.unit_names)}) at optimizer step {step}"

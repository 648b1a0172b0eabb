"""The fp32 masters' life cycle in a fit, owned by the strategy: made at setup, kept through a tuner's trials, saved
in the checkpoint under the strategy's own key, and loaded when a run resumes.

Under ``"bf16-true"`` / ``"16-true"`` the optimizer steps fp32 masters
(:class:`~lightning_hift.precision.MasterWeights`) instead of the half-precision weights, so a checkpoint must hold
them to resume bit for bit. The strategy adds them
to every checkpoint that carries training state, as ``checkpoint["hift_masters"]`` (``{"masters": [...], "scaler":
...}``, the masters in block order), and takes them out again when it loads one. Checkpoints written before kept them
in HiFT's callback state; they load the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_hift.blocks import Block
from lightning_hift.errors import HiFTConfigError
from lightning_hift.optim_state import copy_whole, local, rewrap
from lightning_hift.packages import lightning_classes, private_attribute
from lightning_hift.precision import LossScaler, MasterWeights
from lightning_hift.transfer import HOST, Transfer

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy as _Strategy
else:
    _Strategy = object

MASTERS_KEY = "hift_masters"
"""The checkpoint entry that holds the fp32 masters and the loss scale (half precision only)."""


class MastersLifeCycle(_Strategy):
    """Mixed into the HiFT strategies: the fp32 masters from setup to checkpoint. ``masters`` is None at full
    precision and outside a fit."""

    blocks: list[Block]
    masters: MasterWeights | None

    def _init_masters(self) -> None:
        self.masters = None
        self._masters_before_tuner: list[Tensor] | None = None
        self._masters_to_load: dict[str, Any] | None = None
        """The masters of the checkpoint being resumed, until training starts."""
        self._masters_after_fit: dict[str, Any] | None = None
        """The masters' values once the fit has ended, for ``trainer.save_checkpoint`` after it."""

    def _converts_to_half(self) -> bool:
        return isinstance(self.precision_plugin, lightning_classes("plugins.precision.HalfPrecision"))

    def _half_dtype(self) -> torch.dtype | None:
        """The dtype ``bf16-true`` / ``16-true`` convert the weights to; None at other precisions."""
        if not self._converts_to_half():
            return None
        return private_attribute(self.precision_plugin, "_desired_input_dtype")

    def _make_masters(self, transfer: Transfer, full_values: Mapping[Tensor, Tensor]) -> MasterWeights | None:
        """The masters of this fit's blocks (under half precision), from the fp32 values the conversion rounded
        (``full_values``, by parameter) or else from the half weights."""
        self._masters_after_fit = None
        if not self._converts_to_half():
            return None
        scaler = LossScaler() if self._half_dtype() == torch.float16 else None
        return MasterWeights(self.blocks, self.optimizers[0], self.root_device, scaler, transfer, full_values)

    def _masters_before_trials(self) -> None:
        """A tuner's trials are about to train: Lightning restores the weights and optimizer state after them, but the
        masters are HiFT's to keep."""
        if self.masters is not None and self._masters_before_tuner is None:
            self._masters_before_tuner = self.masters.snapshot()

    def ready_masters(self) -> None:
        """Called when the fit's own training starts (after any tuner's trials): put back the masters the trials
        changed, then load those of the checkpoint being resumed (into the weights, at full precision)."""
        if self.masters is not None and self._masters_before_tuner is not None:
            self.masters.restore(self._masters_before_tuner)
        self._masters_before_tuner = None
        saved, self._masters_to_load = self._masters_to_load, None
        if saved is None:  # none saved (full precision): the masters were made from the checkpoint's fp32 weights
            return
        if self.masters is not None:
            self.masters.load_state_dict(saved)
        else:
            self.load_fp32_weights(saved["masters"])

    def load_fp32_weights(self, values: Sequence[Tensor]) -> None:
        """Set the blocks' weights, in block order, from fp32 values (a half-precision run's masters)."""
        params = [p for block in self.blocks for p in block.params]
        if len(values) != len(params) or any(v.shape != p.shape for v, p in zip(values, params, strict=False)):
            raise HiFTConfigError(
                "The checkpoint's fp32 master weights do not match this model's blocks. Resume with the model and"
                " the HiFT settings (layers_per_block, layers, frozen) that wrote it."
            )
        with torch.no_grad():
            for p, value in zip(params, values, strict=True):
                copy_whole(p, value)

    def _masters_state(self) -> dict[str, Any] | None:
        """What a checkpoint saved now holds of the masters: those still to be loaded (a tuner saves before
        training starts), else the fit's, else those the fit ended with."""
        if self._masters_to_load is not None:
            return self._masters_to_load
        if self.masters is not None:
            return self.masters.state_dict()
        return self._masters_after_fit

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        self._add_masters(checkpoint)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _add_masters(self, checkpoint: dict[str, Any]) -> None:
        masters = self._masters_state() if "optimizer_states" in checkpoint else None  # not weights only
        if masters is not None:
            checkpoint[MASTERS_KEY] = masters

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return self._take_masters(super().load_checkpoint(checkpoint_path, weights_only))

    def _take_masters(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Keep the checkpoint's masters for when training starts (the blocks may not be cut yet)."""
        self._masters_to_load = saved_masters(checkpoint)
        checkpoint.pop(MASTERS_KEY, None)
        for state in _callback_states(checkpoint):
            state.pop("masters")
        return checkpoint

    def _keep_masters_values(self) -> None:
        """At teardown: keep the masters' values (host tensors), not the object that holds device memory."""
        self._masters_after_fit = self.masters.state_dict() if self.masters is not None else None
        self.masters = None
        self._masters_to_load = None


def saved_masters(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fp32 masters' entry of a checkpoint (``{"masters": [...], "scaler": ...}``), or None (full precision):
    under :data:`MASTERS_KEY`, or in HiFT's callback state, where checkpoints written before kept it."""
    masters: dict[str, Any] | None = checkpoint.get(MASTERS_KEY)
    if masters is None:
        masters = next((state["masters"] for state in _callback_states(checkpoint)), None)
    return masters


def _callback_states(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The callback states that hold masters: HiFT's, in a checkpoint written before the strategy saved them."""
    states = checkpoint.get("callbacks", {}).values()
    return [state for state in states if isinstance(state, dict) and isinstance(state.get("masters"), dict)]


def fp32_values(model: nn.Module) -> dict[Tensor, Tensor]:
    """Host copies of the fp32 parameters that may train, before a half-precision conversion rounds them: the
    masters start from them (a user's fp32 model, or a full-precision checkpoint being resumed)."""
    return {
        p: rewrap(p, local(p).detach().to(HOST, copy=True))
        for p in model.parameters()
        if p.dtype == torch.float32 and p.requires_grad
    }

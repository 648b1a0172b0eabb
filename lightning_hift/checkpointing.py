"""Activation checkpointing under HiFT: backward starts at the active block, not at the input embeddings.

Reentrant activation checkpointing (``torch.utils.checkpoint`` with ``use_reentrant=True``) runs a segment under
``no_grad`` and returns an output that requires grad only if one of the segment's positional inputs does, so a
checkpointed layer whose input does not require grad gets no gradient at all. Hugging Face models therefore make
the input embeddings' output require grad when checkpointing is enabled (``enable_input_require_grads``, a forward
hook on the embeddings; transformers 5 installs it whatever ``use_reentrant`` is). Under HiFT that hook makes every
layer's input require grad: each step recomputes, and back-propagates through, all the frozen layers below the
active block, and the time and activation memory that freezing them should save are lost.

:class:`CheckpointInputs` puts the requirement where HiFT needs it. While fitting with checkpointed layers, it takes
the embeddings hook off and gives each checkpointed layer of the active block a forward pre-hook that makes the
layer's hidden-state input require grad. Backward then starts at the active block; the active layer and those above
it are still recomputed in backward, as checkpointing intends. The model is handed back as it came at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_hift.blocks import Block


class CheckpointInputs:
    """Makes the inputs of the active block's checkpointed layers require grad, instead of the embeddings' output.

    A layer counts as checkpointed when it, or a module inside it, has ``gradient_checkpointing=True`` (the flag
    Hugging Face sets on each layer that checkpoints its own ``forward``). A forward pre-hook on such a layer runs
    before its checkpoint starts. Models that checkpoint from outside their layers (older transformers, where the
    flag sits on the module that loops over the layers) carry no flag on a layer: they are left exactly as they are,
    as is every model without checkpointing.

    Call :meth:`start` when fitting starts, :meth:`attach` with each block that becomes active, :meth:`detach` when
    it stops being active, and :meth:`close` when fitting ends.
    """

    def __init__(self) -> None:
        self._units: dict[int, list[nn.Module]] = {}
        self._taken: list[nn.Module] = []
        self._handles: list[RemovableHandle] = []
        self._model: nn.Module | None = None

    def start(self, model: nn.Module, blocks: Sequence[Block]) -> None:
        """Learn which modules each block's units are, in the model the blocks were cut from.

        Args:
            model: The module :func:`~lightning_hift.blocks.partition` cut into ``blocks``.
            blocks: The blocks; units named ``"embeddings"`` or ``"output"`` name no module and are never hooked.
        """
        self.close()
        modules = dict(model.named_modules())
        self._model = model
        self._units = {block.index: [modules[name] for name in block.unit_names if name in modules] for block in blocks}

    def attach(self, block: Block) -> None:
        """Hook the checkpointed layers of ``block``, the block that has just become trainable.

        The embeddings hook is taken off here rather than in :meth:`start`, so that checkpointing enabled after
        setup (in ``on_train_start``) is seen as well.
        """
        self.detach()
        if self._model is None or not any(checkpointed(unit) for units in self._units.values() for unit in units):
            return
        self._take_input_hooks(self._model)
        # Every checkpointed layer of the block, not only the first: a block can span two stacks (T5's encoder and
        # decoder), the second fed from frozen embeddings. Above the first layer the hook costs nothing: the input
        # already requires grad.
        for unit in self._units.get(block.index, []):
            if checkpointed(unit):
                self._handles.append(unit.register_forward_pre_hook(_first_input_requires_grad))

    def detach(self) -> None:
        """Remove the hooks of the block that was active."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def close(self) -> None:
        """Remove every hook this object added and give the models back the embeddings hooks it took."""
        self.detach()
        for model in self._taken:
            model.enable_input_require_grads()  # type: ignore[operator]
        self._taken = []
        self._units = {}
        self._model = None

    def _take_input_hooks(self, model: nn.Module) -> None:
        for module in model.modules():
            if _has_input_hook(module) and callable(getattr(module, "disable_input_require_grads", None)):
                module.disable_input_require_grads()  # type: ignore[operator]
                if module not in self._taken:  # enabled again during the fit: still one hook to give back
                    self._taken.append(module)


def _has_input_hook(module: nn.Module) -> bool:
    """Whether ``enable_input_require_grads`` left a hook of ``module`` installed.

    transformers 5 keeps the handles in ``_require_grads_hooks`` (and the first in ``_require_grads_hook``) and drops
    them when disabled; transformers 4 keeps one in ``_require_grads_hook`` even after removing it.
    """
    handles = getattr(module, "_require_grads_hooks", None) or [getattr(module, "_require_grads_hook", None)]
    return any(isinstance(handle, RemovableHandle) and _installed(handle) for handle in handles)


def _installed(handle: RemovableHandle) -> bool:
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


def checkpointed(module: nn.Module) -> bool:
    """Whether ``module`` or a module inside it checkpoints its activations (Hugging Face's flag)."""
    return any(getattr(inner, "gradient_checkpointing", False) is True for inner in module.modules())


def _first_input_requires_grad(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: the first floating-point positional input (the hidden states) requires grad.

    Only the hidden states, as the embeddings hook did: an attention mask that required grad would get a gradient
    computed in every layer above. A detached alias is passed on instead of changing the caller's tensor in place,
    so that hidden states the model also returns (``output_hidden_states``) are left as they were. Nothing is done
    without grad mode (validation in the middle of a fit), where no backward follows.
    """
    if not torch.is_grad_enabled():
        return None
    for position, value in enumerate(args):
        if isinstance(value, Tensor) and value.is_floating_point():
            if value.requires_grad:
                return None
            return (*args[:position], value.detach().requires_grad_(True), *args[position + 1 :])
    return None

"""The live accounting: the bytes a running HiFT strategy holds, by kind and place, read off its tensors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_hift.memory.plan import MemoryBreakdown
from lightning_hift.optim_state import local
from lightning_hift.transfer import HOST

if TYPE_CHECKING:
    from lightning_hift.strategy import HiFTStrategyBase


def snapshot(strategy: HiFTStrategyBase) -> MemoryBreakdown:
    """Measure the live bytes of a HiFT run by kind and place, from the tensors themselves.

    Each tensor is placed by the memory it is in: a tensor on the accelerator counts as device bytes, whatever the
    strategy believes of it. Sharded tensors (FSDP2) count the shard this process holds. Pinned bytes are those of the
    page-locked host storages that hold optimizer state and masters. Where host and device are one memory (a run on
    the CPU), the optimizer state and masters the strategy sent to rest are labelled host bytes, so the figures read
    as they would on an accelerator. The scalar ``step`` counters are left out.
    """
    breakdown = MemoryBreakdown()
    module = strategy.lightning_module
    assert module is not None
    device = strategy.root_device
    for p in module.parameters():
        breakdown.add("params", _place(local(p), device), local(p).nbytes)
        if p.grad is not None:
            breakdown.add("grads", _place(local(p.grad), device), local(p.grad).nbytes)
    resting: list[Tensor] = []
    placement, masters = strategy.placement, strategy.masters
    if placement is not None:
        for block in strategy.blocks:
            at_rest = placement.where(block) == "host"
            for value in _state_tensors(placement.optimizer.state, placement.keys(block)):
                breakdown.add("optimizer_state", _place(value, device, at_rest), value.nbytes)
                resting.append(value)
        # The next block's copies already on their way to the device (CUDA), beside their host originals.
        breakdown.add("optimizer_state", "device", placement.transfer.incoming_bytes("state"))
        breakdown.add("masters", "device", placement.transfer.incoming_bytes("master"))
    if masters is not None:
        for block in strategy.blocks:
            at_rest = masters.where(block) == "host"
            for master in masters.masters(block):
                breakdown.add("masters", _place(local(master), device, at_rest), local(master).nbytes)
                resting.append(local(master))
    breakdown.pinned = _pinned_bytes(resting)
    return breakdown


def _place(tensor: Tensor, device: torch.device, at_rest: bool = False) -> str:
    """ "device" for a tensor in the accelerator's memory; "host" for one in host memory beside an accelerator, and,
    where the two are one memory, for one the strategy sent to rest."""
    if tensor.device.type != HOST.type:
        return "device"
    return "host" if device.type != HOST.type or at_rest else "device"


def _state_tensors(state: Any, params: Iterable[Tensor]) -> list[Tensor]:
    return [
        local(value)
        for p in params
        for key, value in state.get(p, {}).items()
        if isinstance(value, Tensor) and key != "step"
    ]


def _pinned_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct page-locked host storages holding ``tensors`` (a block's buffer counts once, whole)."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        if tensor.device.type == HOST.type and torch.accelerator.is_available() and tensor.is_pinned():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())

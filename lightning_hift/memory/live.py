"""The live accounting: the bytes a running HiFT strategy holds, by kind and place, read off its tensors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from lightning_hift.memory.plan import MemoryBreakdown
from lightning_hift.optim_state import local
from lightning_hift.transfer import HOST

if TYPE_CHECKING:
    from lightning_hift.strategy import HiFTStrategyBase


def snapshot(strategy: HiFTStrategyBase) -> MemoryBreakdown:
    """Measure the live bytes of a HiFT run by kind and place.

    Parameters and gradients are placed by the device their tensors are on. Optimizer state and fp32 masters
    are placed where the strategy keeps them: on a CPU-only machine host and device are one memory, and the
    strategy's bookkeeping is what tells them apart. The scalar ``step`` counters are left out.
    """
    breakdown = MemoryBreakdown()
    module = strategy.lightning_module
    assert module is not None
    # Sharded tensors (FSDP2) count what this process holds.
    for p in module.parameters():
        held = local(p)
        breakdown.add("params", _place(held, strategy.root_device), held.nbytes)
        if p.grad is not None:
            grad = local(p.grad)
            breakdown.add("grads", _place(grad, strategy.root_device), grad.nbytes)
    placement, masters = strategy.placement, strategy.masters
    if placement is not None:
        for block in strategy.blocks:
            place = "host" if placement.where(block) == "host" else "device"
            breakdown.add("optimizer_state", place, _state_bytes(placement.optimizer.state, placement.keys(block)))
        # The next block's copies already on their way to the device (CUDA), beside their host originals.
        breakdown.add("optimizer_state", "device", placement.transfer.incoming_bytes("state"))
        breakdown.add("masters", "device", placement.transfer.incoming_bytes("master"))
        breakdown.pinned = placement.transfer.pinned_bytes
    if masters is not None:
        for block in strategy.blocks:
            nbytes = sum(local(master).nbytes for master in masters.masters(block))
            breakdown.add("masters", "host" if masters.where(block) == "host" else "device", nbytes)
    return breakdown


def _place(tensor: torch.Tensor, device: torch.device) -> str:
    return "host" if tensor.device.type == HOST.type and device.type != HOST.type else "device"


def _state_bytes(state: Any, params: Iterable[torch.Tensor]) -> int:
    return sum(
        local(value).nbytes
        for p in params
        for key, value in state.get(p, {}).items()
        if isinstance(value, torch.Tensor) and key != "step"
    )

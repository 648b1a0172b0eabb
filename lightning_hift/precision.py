"""fp32 master weights for half-precision training ("Mixed^Hi" in the HiFT paper).

Under ``Trainer(precision="bf16-true")`` or ``"16-true"`` the model's weights stay in half precision on the
device. Updating them directly loses every update smaller than half a unit in the last place of the weight
(bf16 keeps 8 significant bits), so a small learning rate would not move the model at all. Here each trainable
parameter has an fp32 master copy; only the active block's masters are on the device, the rest wait in host
memory. The user's optimizer holds the masters instead of the half weights (substituted once, when fitting
starts), receives fp32 gradients, and after each step the half weights are refreshed from the masters.

Under ``"16-true"`` the loss is scaled dynamically so that small fp16 gradients do not flush to zero; a step
whose gradients overflow is skipped (no master, weight or optimizer state changes) and the scale is halved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_hift.blocks import Block
from lightning_hift.optim_state import Place, copy_whole, gather_to_first, local, rewrap
from lightning_hift.packages import private_attribute
from lightning_hift.transfer import Transfer

SHARDED_PRECISIONS = ("32-true", "bf16-true", "bf16-mixed")
"""The precisions ``hift_fsdp`` trains at: fp16 needs loss scaling, whose overflow check would see one shard per
process."""

MAX_LOSS_SCALE = 2.0**15
"""The largest loss scale: backward starts from the scale itself, and under ``"16-true"`` a module's loss is often an
fp16 tensor, whose gradient is then the scale in fp16. 2**16 is past fp16's largest value (65504) and would overflow
at every step; 2**15 is the largest power of two below it."""


class LossScaler:
    """Dynamic loss scaling for fp16 gradients: halve on overflow, double after ``growth_interval`` good steps, up to
    :data:`MAX_LOSS_SCALE`."""

    def __init__(self, scale: float = MAX_LOSS_SCALE, growth_interval: int = 1000) -> None:
        self.scale = min(scale, MAX_LOSS_SCALE)
        self.growth_interval = growth_interval
        self.good_steps = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale / 2, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale = min(self.scale * 2, MAX_LOSS_SCALE)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A checkpoint written before the cap may hold 2**16.
        self.scale, self.good_steps = min(float(state["scale"]), MAX_LOSS_SCALE), int(state["good_steps"])


class MasterWeights:
    """The fp32 masters of every block, placed like optimizer state: the active block's on the device.

    Args:
        blocks: the partition (its params are the half-precision weights).
        optimizer: the user's optimizer, built over the half weights; its params are replaced by their masters.
        device: the compute device.
        scaler: a loss scaler under fp16, None under bf16.
        transfer: the copier to use; one is made for ``device`` by default.
        full_values: fp32 host copies of weights that were rounded to half precision, keyed by parameter; they
            become those parameters' masters (the others start from their half weights).
    """

    def __init__(
        self,
        blocks: list[Block],
        optimizer: Optimizer,
        device: torch.device,
        scaler: LossScaler | None,
        transfer: Transfer | None = None,
        full_values: Mapping[Tensor, Tensor] | None = None,
    ) -> None:
        self.blocks = blocks
        self.device = device
        self.scaler = scaler
        self.transfer = transfer or Transfer(device)
        self.skipped_steps = 0
        self.gather = True
        """Whether :meth:`state_dict` gathers sharded masters whole (False for a sharded checkpoint)."""
        self._master: dict[int, nn.Parameter] = {}
        self._places: list[Place] = ["host"] * len(blocks)
        full_values = full_values or {}
        for block in blocks:
            for p in block.params:
                full = full_values.get(p)
                # Made where the weight is (a DTensor master then reports the compute device, as its gradients and
                # optimizer state do during its block's turns), and sent to rest below, a block at a time.
                source = local(full if full is not None else p).detach()
                master = nn.Parameter(rewrap(p, source.to(device, torch.float32, copy=True)), requires_grad=False)
                self._master[id(p)] = master
            self._to_pinned(block)  # on CUDA, so that the first copy to the device overlaps compute
        self._substitute(optimizer)

    def masters(self, block: Block) -> list[nn.Parameter]:
        """The masters of ``block``, in the order of ``block.params``: the tensors the optimizer updates."""
        return [self._master[id(p)] for p in block.params]

    def where(self, block: Block) -> Place:
        return self._places[block.index]

    def to_device(self, block: Block) -> None:
        prefetched = self.transfer.take(("master", block.index))
        for master in self.masters(block):
            copy = prefetched.get(id(master))
            _set_local(master, copy if copy is not None else self.transfer.to_device(local(master)))
        self._places[block.index] = "device"

    def prefetch(self, block: Block) -> None:
        """Start bringing the block's masters to the device while the current step computes (CUDA)."""
        if self._places[block.index] == "host":
            self.transfer.prefetch(("master", block.index), {id(m): local(m).detach() for m in self.masters(block)})

    def to_host(self, block: Block) -> None:
        for master in self.masters(block):
            master.grad = None
        self._to_pinned(block)
        self._places[block.index] = "host"

    def _to_pinned(self, block: Block) -> None:
        masters = self.masters(block)
        host = self.transfer.to_host(("master", block.index), {id(m): local(m).detach() for m in masters})
        for master in masters:
            _set_local(master, host[id(master)])

    def scale_loss(self, loss: Tensor) -> Tensor:
        # Multiplied in fp32 so that the scaled loss itself cannot overflow; the gradient that reaches an fp16 loss is
        # the scale rounded to fp16, which MAX_LOSS_SCALE keeps finite.
        return loss.float() * self.scaler.scale if self.scaler is not None else loss

    def grads_to_masters(self, block: Block) -> bool:
        """Move the half gradients of ``block`` into fp32 master gradients; False if the step must be skipped.

        The step is skipped when no parameter of the block received a gradient, or when a gradient is not
        finite under loss scaling; the masters then get no gradient, so the optimizer leaves them alone.
        """
        unscale = 1.0 / self.scaler.scale if self.scaler is not None else 1.0
        received = False
        for p, master in zip(block.params, self.masters(block), strict=True):
            if p.grad is not None:
                master.grad = p.grad.float().mul_(unscale) if unscale != 1.0 else p.grad.float()
                # The half gradient stays until the step is done, unscaled, for the hooks that read the module's
                # gradients before the step (on_before_optimizer_step, Lightning's grad_norm).
                if unscale != 1.0:
                    p.grad.mul_(unscale)
                received = True
        if self.scaler is None:
            return received
        overflow = received and not all_finite([m.grad for m in self.masters(block) if m.grad is not None])
        self.scaler.update(overflow)
        if overflow:
            self.skipped_steps += 1
            for p, master in zip(block.params, self.masters(block), strict=True):
                p.grad = master.grad = None
        return received and not overflow

    def add_pass_grads(self, block: Block) -> bool:
        """Add the gradients of a later closure call within the same step (SAM's second pass) to the masters'.

        The masters' gradients hold what the optimizer left them (None after its zero_grad); this pass's gradients are
        added in fp32. Returns False, adding nothing, if they overflowed under loss scaling.
        """
        unscale = 1.0 / self.scaler.scale if self.scaler is not None else 1.0
        pairs = [(p, m) for p, m in zip(block.params, self.masters(block), strict=True) if p.grad is not None]
        added = [p.grad.to(torch.float32, copy=True).mul_(unscale) for p, _ in pairs]  # type: ignore[union-attr]
        if self.scaler is not None and added and not all_finite(added):
            return False
        for (p, master), grad in zip(pairs, added, strict=True):
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            if unscale != 1.0:
                p.grad.mul_(unscale)  # type: ignore[union-attr]  # unscaled, for hooks that read the module's
        return True

    def lower_scale(self) -> bool:
        """Halve the loss scale after an overflow; False if there is no scaling left to lower."""
        if self.scaler is None or self.scaler.scale <= 1.0:
            return False
        self.scaler.update(overflow=True)
        return True

    def sync_weights(self, block: Block) -> None:
        """Copy the block's masters into its half weights and drop the weights' gradients: the forward of a further
        pass within the step runs on what the optimizer has set."""
        with torch.no_grad():
            for p, master in zip(block.params, self.masters(block), strict=True):
                p.copy_(master)
                p.grad = None

    def masters_to_weights(self, block: Block) -> None:
        """Copy the block's stepped masters into its half weights, and drop the step's gradients."""
        self.sync_weights(block)
        for master in self.masters(block):
            master.grad = None

    def _in_order(self) -> list[nn.Parameter]:
        """Every master, block by block: the order of a checkpoint's ``masters`` list and of :meth:`snapshot`."""
        return [m for block in self.blocks for m in self.masters(block)]

    def state_dict(self) -> dict[str, Any]:
        """The masters and the loss scale. Sharded masters (FSDP2) are gathered whole for a consolidated checkpoint,
        and kept on process 0 only (the others return an empty dict, as Lightning's full state dicts do), or kept
        as this process's shards for a sharded checkpoint (``gather=False``)."""
        self.transfer.synchronize()
        masters: list[Tensor | None] = [
            gather_to_first(m.detach(), self.device) if self.gather else m.detach() for m in self._in_order()
        ]
        if any(m is None for m in masters):
            return {}
        return {"masters": masters, "scaler": self.scaler.state_dict() if self.scaler else None}

    def snapshot(self) -> list[Tensor]:
        """A copy of this process's masters (its shards, under FSDP2), for :meth:`restore`."""
        self.transfer.synchronize()
        return [local(m).detach().clone() for m in self._in_order()]

    def restore(self, snapshot: list[Tensor]) -> None:
        """Put back the masters :meth:`snapshot` copied (after a tuner's trials changed them)."""
        self.transfer.discard("master")
        with torch.no_grad():
            for m, saved in zip(self._in_order(), snapshot, strict=True):
                local(m).copy_(saved)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["masters"]
        mine = self._in_order()
        if len(saved) != len(mine) or any(s.shape != m.shape for s, m in zip(saved, mine, strict=False)):
            raise ValueError("The checkpoint's fp32 master weights do not match this model's blocks.")
        self.transfer.discard("master")
        with torch.no_grad():
            for s, m in zip(saved, mine, strict=True):
                copy_whole(m, s)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def _substitute(self, optimizer: Optimizer) -> None:
        # Done once when fitting starts: afterwards the optimizer's param groups are never touched again.
        for group in optimizer.param_groups:
            group["params"] = [self._master.get(id(p), p) for p in group["params"]]
        for old in list(optimizer.state):
            master = self._master.get(id(old))
            if master is not None:
                state = optimizer.state.pop(old)
                # Eagerly created state (Adagrad's) was made in half precision for the half weights.
                optimizer.state[master] = {
                    key: value.to(self.device, torch.float32) if _is_float_tensor(value) and key != "step" else value
                    for key, value in state.items()
                }


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element is finite, with one host sync for all the tensors rather than one per tensor."""
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def _set_local(master: Tensor, moved: Tensor) -> None:
    """Point ``master`` at ``moved`` (a copy of its values, or of its local shard, elsewhere) in place: the optimizer
    holds ``master`` itself. A DTensor's local shard is swapped as FSDP2 swaps its own."""
    if moved is local(master):
        return
    if hasattr(master, "device_mesh"):
        private_attribute(master, "_local_tensor")  # still the name of a DTensor's shard in this torch
        master._local_tensor = moved  # type: ignore[attr-defined]
    else:
        master.data = moved


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()

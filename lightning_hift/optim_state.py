"""Where each block's optimizer state lives while the block waits for its turn.

Modes:
    ``"offload"``: in host memory; pinned and copied without blocking the host when the device is CUDA.
    ``"reset"``: dropped when the block's turn ends and recreated fresh at its next turn (BAdam's choice).
    ``"keep"``: left on the device (the fastest, and the most device memory).

The user's optimizer is never forked or wrapped: this module only moves or drops the tensors in
``optimizer.state[param]``. Torch optimizers skip parameters whose ``.grad`` is None, so a block's state is
needed on the device only during its own turn.

On a CPU-only machine host and device are the same memory: the moves are skipped and :meth:`where` is the
bookkeeping that the accounting and the tests read. On CUDA the copies run on a side stream
(:mod:`lightning_hift.transfer`), and the next block's state can be prefetched while the current step computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Any, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_hift.blocks import Block
from lightning_hift.errors import HiFTConfigError
from lightning_hift.packages import private_attribute
from lightning_hift.transfer import HOST, Transfer

OptimizerStateMode = Literal["offload", "reset", "keep"]
Place = Literal["device", "host", "absent"]
MODES: tuple[str, ...] = ("offload", "reset", "keep")


def check_mode(mode: str) -> None:
    if not isinstance(mode, str) or mode not in MODES:
        raise HiFTConfigError(f"Unknown optimizer_state={mode!r}. Choose one of {list(MODES)}.")


def _moves_with_param(key: str, group: Mapping[str, Any]) -> bool:
    # torch keeps the scalar "step" on the host unless the optimizer is capturable or fused (as Lightning does).
    return key != "step" or bool(group.get("capturable") or group.get("fused"))


class OptimizerStatePlacement:
    """Moves the optimizer state of whole blocks between the device and its resting place.

    Args:
        mode: one of :data:`MODES`.
        optimizer: the user's optimizer; it must hold every parameter of ``blocks``.
        blocks: the partition.
        device: the compute device.
        keys: the tensors that key a block's state in ``optimizer.state``; by default the block's parameters
            (under half precision, their fp32 masters).
        transfer: the copier to use; one is made for ``device`` by default.
    """

    def __init__(
        self,
        mode: str,
        optimizer: Optimizer,
        blocks: list[Block],
        device: torch.device,
        keys: Callable[[Block], Sequence[Tensor]] | None = None,
        transfer: Transfer | None = None,
    ) -> None:
        check_mode(mode)
        self.mode = mode
        self.optimizer = optimizer
        self.blocks = blocks
        self.device = device
        self.keys: Callable[[Block], Sequence[Tensor]] = keys or (lambda block: block.params)
        self._groups_seen: tuple[int, ...] = ()
        self._group_of: dict[Tensor, dict[str, Any]] = {}
        self.transfer = transfer or Transfer(device)
        self._places: list[Place] = ["absent"] * len(blocks)
        # Optimizers such as Adagrad create their state in __init__ and never again; "reset" must rebuild it.
        self._initial = self._capture_initial_state() if mode == "reset" else {}
        for block in blocks:
            self.to_rest(block)

    @property
    def moves_memory(self) -> bool:
        """Whether host and device are different memories (no copies are made when they are not)."""
        return self.device.type != HOST.type

    def where(self, block: Block) -> Place:
        """Where the block's optimizer state is now ("absent": dropped, or not created by the optimizer yet)."""
        return self._places[block.index]

    def to_device(self, block: Block) -> None:
        """Bring the block's state to the device for its turn (waiting for a prefetch if one was started)."""
        prefetched = self.transfer.take(("state", block.index))
        for p in self.keys(block):
            if self.mode == "reset" and p in self._initial and p not in self.optimizer.state:
                self.optimizer.state[p] = {key: make() for key, make in self._initial[p].items()}
            elif self.mode == "offload" and self.moves_memory:
                state = self.optimizer.state.get(p, {})
                for key, value in self._movable(p):
                    copy = prefetched.get((id(p), key))
                    state[key] = rewrap(value, copy if copy is not None else self.transfer.to_device(local(value)))
        self._places[block.index] = "device"

    def prefetch(self, block: Block) -> None:
        """Start bringing an offloaded block's state to the device while the current step computes (CUDA)."""
        if self.mode != "offload" or not self.moves_memory or self._places[block.index] != "host":
            return
        values = {(id(p), key): local(value) for p in self.keys(block) for key, value in self._movable(p)}
        self.transfer.prefetch(("state", block.index), values)

    def to_rest(self, block: Block) -> None:
        """Send the block's state to where it waits: host memory, nowhere, or the device."""
        if self.mode == "reset":
            for p in self.keys(block):
                self.optimizer.state.pop(p, None)
        elif self.mode == "offload" and self.moves_memory:
            self._to_host(block)
        self._places[block.index] = self._rest_place(block)

    def drop(self, blocks: Sequence[Block]) -> int:
        """Drop the optimizer state of ``blocks``, as "reset" does at the end of a turn.

        Returns:
            How many of the blocks had state.
        """
        dropped = 0
        for block in blocks:
            dropped += any([self.optimizer.state.pop(p, None) for p in self.keys(block)])
            self._places[block.index] = self._rest_place(block)
        return dropped

    def load(self, state_dict: Mapping[str, Any]) -> None:
        """Load an optimizer checkpoint, putting each block's state straight where it rests.

        ``Optimizer.load_state_dict`` would first copy every state tensor to its parameter's device: the
        whole-model peak that offloading exists to avoid. Here each tensor goes to its resting place directly.
        """
        self.transfer.discard("state")
        self.optimizer.load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.optimizer.param_groups)
        param_of = dict(zip(saved_ids, params, strict=True))
        for saved_id, state in state_dict["state"].items():
            p = param_of[saved_id]
            group = self._group(p)
            # Keep and reset hold state on the compute device; under half precision the keys are fp32 masters
            # that rest in host memory, so their own device would be the wrong place.
            target = HOST if self.mode == "offload" else self.device
            self.optimizer.state[p] = {
                key: _cast_like(value, p, target) if _moves_with_param(key, group) else value
                for key, value in state.items()
            }
        self.settle()

    def convert(self, saved_mode: str | None, active: int, mid_slot: bool) -> None:
        """Bring state resumed from a run with another ``optimizer_state`` (``saved_mode``) to what this mode keeps.

        Offload and keep hold the same state in different places, so a switch between them is exact. Resumed under
        "reset", the state of every block but ``active`` in the middle of its turn (``mid_slot``) is dropped. From a
        "reset" checkpoint, the blocks that were waiting have no state: they start afresh at their next turn.
        """
        if saved_mode in (None, self.mode):
            return
        if self.mode == "reset":
            keep = {active} if mid_slot else set()
            dropped = self.drop([b for b in self.blocks if b.index not in keep])
            if dropped:
                rank_zero_warn(
                    f"HiFT: the checkpoint was written with optimizer_state={saved_mode!r}; resuming with 'reset'"
                    f" dropped the saved optimizer state of {dropped} blocks, as a 'reset' run would have."
                )
        elif saved_mode == "reset":
            rank_zero_warn(
                f"HiFT: the checkpoint was written with optimizer_state='reset', which keeps no state for waiting"
                f" blocks; under {self.mode!r} they start with fresh optimizer state at their next turn and keep it"
                " from then on."
            )

    def settle(self) -> None:
        """Put every block's state where it rests, after something other than :meth:`load` filled the optimizer's
        state (a sharded checkpoint's loader, which puts it all on the device)."""
        self.transfer.discard("state")
        for block in self.blocks:
            if self.mode == "offload" and self.moves_memory:
                self._to_host(block)  # into the block's pinned buffer
            self._places[block.index] = self._rest_place(block)

    def synchronize(self) -> None:
        """Wait for copies in flight, before the host reads offloaded state (for a checkpoint, say)."""
        self.transfer.synchronize()

    def _rest_place(self, block: Block) -> Place:
        if not any(self.optimizer.state.get(p) for p in self.keys(block)):
            return "absent"
        return "host" if self.mode == "offload" else "device"

    def _group(self, p: Tensor) -> dict[str, Any]:
        """The param group holding ``p``. ``Optimizer.load_state_dict`` and ``add_param_group`` replace or add
        group dicts, so the lookup is rebuilt whenever the groups are not the ones it was built from."""
        groups = self.optimizer.param_groups
        seen = tuple(id(group) for group in groups)
        if seen != self._groups_seen:
            self._group_of = {q: group for group in groups for q in group["params"]}
            self._groups_seen = seen
        return self._group_of[p]

    def _movable(self, p: Tensor) -> list[tuple[str, Tensor]]:
        group = self._group(p)
        state = self.optimizer.state.get(p, {})
        return [(k, v) for k, v in state.items() if isinstance(v, Tensor) and _moves_with_param(k, group)]

    def _to_host(self, block: Block) -> None:
        moving = [(p, key, value) for p in self.keys(block) for key, value in self._movable(p)]
        if not moving:
            return
        host = self.transfer.to_host(("state", block.index), {(id(p), key): local(v) for p, key, v in moving})
        for p, key, value in moving:
            self.optimizer.state[p][key] = rewrap(value, host[(id(p), key)])

    def _capture_initial_state(self) -> dict[Tensor, dict[str, Any]]:
        return {
            p: {key: _constant_maker(value, key, self.optimizer) for key, value in state.items()}
            for p, state in self.optimizer.state.items()
        }


def local(value: Tensor) -> Tensor:
    """The part of ``value`` this process holds: the local shard of a DTensor (sharded state under FSDP2), else
    ``value`` itself. Only that part moves between host and device."""
    to_local = getattr(value, "to_local", None)
    return to_local() if callable(to_local) and hasattr(value, "device_mesh") else value


def whole(value: Tensor) -> Tensor:
    """All of ``value``: a DTensor's shards gathered from every process (a collective: every process must call it),
    else ``value`` itself."""
    full_tensor = getattr(value, "full_tensor", None)
    return full_tensor() if callable(full_tensor) and hasattr(value, "device_mesh") else value


def shard_like(like: Tensor, value: Tensor) -> Tensor:
    """``value`` (whole, as every process read it from a checkpoint) laid out like ``like``: this process's shard as a
    DTensor when ``like`` is one (nothing is sent), else ``value`` itself."""
    if not hasattr(like, "device_mesh") or hasattr(value, "device_mesh"):  # nothing to shard, or sharded already
        return value
    from torch.distributed.tensor import DTensor, distribute_tensor

    assert isinstance(like, DTensor)
    return distribute_tensor(
        value.to(like.device_mesh.device_type), like.device_mesh, like.placements, src_data_rank=None
    )


def copy_whole(dst: Tensor, src: Tensor) -> None:
    """Copy ``src``, whole values (from a consolidated checkpoint), into ``dst``; a DTensor takes its own shard."""
    local(dst).copy_(local(shard_like(dst, src)))


def rewrap(value: Tensor, moved: Tensor) -> Tensor:
    """``moved`` (a copy of ``local(value)`` elsewhere, of any dtype) as what ``value`` is: a DTensor with the same mesh
    and layout when ``value`` is one, else ``moved`` itself.

    The shard stays where ``moved`` is: a state tensor resting in host memory stays there although its mesh is on the
    accelerator. (``DTensor.from_local`` would copy a host shard back to the mesh's device, on the compute stream.)
    Nothing is copied or read, so a host buffer still being filled by a side-stream copy may be wrapped.
    """
    if not hasattr(value, "device_mesh"):
        return moved
    from torch.distributed.tensor import DTensor

    spec = private_attribute(value, "_spec")
    if spec.tensor_meta.dtype != moved.dtype:
        spec = dataclasses.replace(spec, tensor_meta=spec.tensor_meta._replace(dtype=moved.dtype))
    wrapped: Tensor = DTensor(moved, spec, requires_grad=False)
    return wrapped


def gather_to_first(value: Tensor, device: torch.device) -> Tensor | None:
    """``value`` whole, in host memory, on process 0 and ``None`` on the others: for a consolidated checkpoint.

    A DTensor is gathered on ``device`` wherever its shard rests (NCCL gathers device memory only), one tensor at a
    time, the way Lightning gathers a full state dict: every process takes part, only process 0 keeps a host copy. A
    plain tensor, whole on every process already, is returned in host memory.
    """
    if not hasattr(value, "device_mesh"):
        return value.to(HOST)
    gathered = whole(rewrap(value, local(value).to(device)))
    return gathered.to(HOST) if torch.distributed.get_rank() == 0 else None


def _cast_like(value: Any, p: Tensor, device: torch.device) -> Any:
    if not isinstance(value, Tensor):
        return value
    dtype = p.dtype if p.is_floating_point() and value.is_floating_point() else value.dtype
    return value.to(device=device, dtype=dtype)


def _constant_maker(value: Any, key: str, optimizer: Optimizer) -> Any:
    """A function that recreates an eagerly created state value, which must be constant (Adagrad's are)."""
    if not isinstance(value, Tensor):
        return lambda: value
    flat = value.flatten()
    if flat.numel() and not bool((flat == flat[0]).all()):
        raise HiFTConfigError(
            f"optimizer_state='reset' cannot recreate the state {key!r} that {type(optimizer).__name__} created"
            " at construction (it is not a constant fill). Use optimizer_state='offload' or 'keep'."
        )
    fill = flat[0].item() if flat.numel() else 0
    shape, dtype, device = value.shape, value.dtype, value.device
    return lambda: torch.full(shape, fill, dtype=dtype, device=device)

"""Copies between the accelerator and pinned host memory, off the compute stream.

Used for offloaded optimizer state and for fp32 master weights. On CUDA every copy runs on one side stream:

* to the host (:meth:`Transfer.to_host`): a whole block's tensors at once, into one host buffer per block that is
  allocated at the block's exact size, pinned, and reused every cycle. The side stream first waits for the compute
  stream (the optimizer step wrote the values).
* to the device, ahead of time (:meth:`Transfer.prefetch`): the next block's tensors are copied while the
  current step computes, and the compute stream waits on an event only when the block becomes active.

Why one buffer per block, pinned by registering ordinary host memory with the driver: torch's pinned allocator
rounds every allocation up to a power of two (a 172 MiB tensor takes 256 MiB), so one pinned tensor per state
tensor would pin about a third more than the state holds, and more than the accounting could see.

The host must call :meth:`Transfer.synchronize` before it reads a pinned buffer (to write a checkpoint, say).
On a CPU device nothing is copied.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

HOST = torch.device("cpu")

_REGISTER_PORTABLE = 1

ALIGN = 64
"""Bytes to which each tensor's offset in a block buffer is rounded: a multiple of every dtype's size."""


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in a block buffer."""

    offset: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def layout(values: Mapping[Any, Tensor]) -> tuple[dict[Any, Slot], int]:
    """The tensors of ``values`` laid end to end, each at a multiple of :data:`ALIGN`, and the bytes they take.

    >>> slots, size = layout({"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.float16)})
    >>> slots["b"].offset, size
    (64, 68)
    """
    slots: dict[Any, Slot] = {}
    end = 0
    for key, value in values.items():
        offset = -(-end // ALIGN) * ALIGN
        slots[key] = Slot(offset, value.shape, value.dtype)
        end = offset + slots[key].nbytes
    return slots, end


class BlockBuffer:
    """One host allocation holding a block's tensors at the offsets :func:`layout` gives.

    Args:
        slots: the layout.
        nbytes: its size.
        pin: page-lock the allocation so that copies to and from the device run asynchronously (CUDA).
    """

    def __init__(self, slots: dict[Any, Slot], nbytes: int, pin: bool) -> None:
        self.slots = slots
        self.base = torch.empty(nbytes, dtype=torch.uint8, device=HOST)
        self.pinned_bytes = _pin(self.base) if pin else 0
        self.views = {
            key: self.base[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
            for key, slot in slots.items()
        }

    def fits(self, slots: dict[Any, Slot]) -> bool:
        return slots == self.slots


def _pin(base: Tensor) -> int:
    """Page-lock ``base`` for the CUDA driver until it is freed; returns the bytes pinned."""
    if base.nbytes == 0:
        return 0
    cudart = torch.cuda.cudart()
    # cudaHostRegisterPortable: pinned for every device's context, not only the one current now.
    error = int(cudart.cudaHostRegister(base.data_ptr(), base.nbytes, _REGISTER_PORTABLE))
    if error != 0:
        raise RuntimeError(
            f"HiFT could not pin {base.nbytes / 2**30:.2f} GiB of host memory for offloaded optimizer state or fp32"
            f" masters (cudaHostRegister returned CUDA error {error}). Free host memory, or pass"
            " optimizer_state='reset' or 'keep' to keep nothing in host memory."
        )
    # Unregistered when the buffer is freed: the driver must not keep pinning an address the allocator reuses.
    weakref.finalize(base, cudart.cudaHostUnregister, base.data_ptr())
    return base.nbytes


class Transfer:
    """Device <-> pinned-host copies on a side stream.

    Args:
        device: the compute device; copies are made only when it is a CUDA device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.enabled else None
        self._buffers: dict[Hashable, BlockBuffer] = {}
        self._incoming: dict[Hashable, tuple[torch.cuda.Event, dict[Any, Tensor]]] = {}

    def __len__(self) -> int:
        """Number of block buffers allocated so far."""
        return len(self._buffers)

    @property
    def pinned_bytes(self) -> int:
        """Host bytes pinned by this copier: exactly its block buffers' sizes."""
        return sum(buffer.pinned_bytes for buffer in self._buffers.values())

    def to_host(self, tag: Hashable, values: Mapping[Any, Tensor]) -> dict[Any, Tensor]:
        """Copy a block's tensors into the pinned buffer of ``tag`` and return the buffer's views, by key.

        Values already in host memory (the masters made at setup, state loaded from a checkpoint) are copied in
        too, so that every tensor at rest is pinned.
        """
        if not self.enabled:
            return dict(values)
        assert self._stream is not None
        slots, nbytes = layout(values)
        buffer = self._buffers.get(tag)
        on_host = any(value.device.type == HOST.type for value in values.values())
        if buffer is not None and (on_host or not buffer.fits(slots)):
            # The host is about to write the buffer, or to drop it (and with it the driver's pinning): copies on either
            # stream may still read it. Rare: at a resume, or when a block's state changes shape.
            self.synchronize()
        if buffer is None or not buffer.fits(slots):
            buffer = self._buffers[tag] = BlockBuffer(slots, nbytes, pin=True)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        for key, value in values.items():
            view = buffer.views[key]
            if value.device.type == HOST.type:
                if value.data_ptr() != view.data_ptr():
                    view.copy_(value)
                continue
            with torch.cuda.stream(self._stream):
                view.copy_(value, non_blocking=True)
            # The device memory must not be handed out again before the side stream has read it.
            value.record_stream(self._stream)
        return dict(buffer.views)

    def to_device(self, value: Tensor) -> Tensor:
        """Copy ``value`` to the device now, on the compute stream, after any copy still writing its buffer."""
        if not self.enabled or value.device == self.device:
            return value
        assert self._stream is not None
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return value.to(self.device, non_blocking=True)

    def prefetch(self, tag: Hashable, values: Mapping[Any, Tensor]) -> None:
        """Start copying ``values`` to the device; :meth:`take` with the same ``tag`` collects them."""
        if not self.enabled or tag in self._incoming:
            return
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            copies = {key: value.to(self.device, non_blocking=True) for key, value in values.items()}
            event = torch.cuda.Event()
            event.record(self._stream)
        self._incoming[tag] = (event, copies)

    def take(self, tag: Hashable) -> dict[Any, Tensor]:
        """The prefetched copies of ``tag``, ready for the compute stream (empty if none were prefetched)."""
        incoming = self._incoming.pop(tag, None)
        if incoming is None:
            return {}
        event, copies = incoming
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for copy in copies.values():
            copy.record_stream(compute)  # made on the side stream, used and freed on the compute stream
        return copies

    def discard(self, kind: str) -> None:
        """Forget the prefetched copies whose tag starts with ``kind``: their sources are about to be overwritten (a
        checkpoint loads, or a tuner's trials are undone), so they would bring stale values."""
        self.synchronize()
        for tag in [tag for tag in self._incoming if isinstance(tag, tuple) and tag[0] == kind]:
            del self._incoming[tag]

    def incoming_bytes(self, kind: str) -> int:
        """Device bytes of the prefetched copies not taken yet whose tag starts with ``kind`` ("state", "master")."""
        return sum(
            copy.nbytes
            for tag, (_, copies) in self._incoming.items()
            if isinstance(tag, tuple) and tag[0] == kind
            for copy in copies.values()
        )

    def synchronize(self) -> None:
        if self.enabled:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Wait for copies in flight and let go of the prefetched device copies and the pinned buffers (at the end of
        a fit: the tensors that still use a buffer keep it alive)."""
        self.synchronize()
        self._incoming.clear()
        self._buffers.clear()

"""Copies between the accelerator and pinned host memory, off the compute stream.

Used for offloaded optimizer state and for fp32 master weights. On CUDA every copy runs on one side stream:

* to the host: the side stream first waits for the compute stream (the optimizer step wrote the values), then
  copies into a pinned buffer that is allocated once per tensor and reused every cycle;
* to the device, ahead of time (:meth:`Transfer.prefetch`): the next block's tensors are copied while the
  current step computes, and the compute stream waits on an event only when the block becomes active.

The host must call :meth:`Transfer.synchronize` before it reads a pinned buffer (to write a checkpoint, say).
On a CPU device nothing is copied.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import Tensor

HOST = torch.device("cpu")


class Transfer:
    """Device <-> pinned-host copies on a side stream.

    Args:
        device: the compute device; copies are made only when it is a CUDA device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.enabled else None
        self._buffers: dict[tuple[int, str], Tensor] = {}
        self._incoming: dict[Hashable, tuple[torch.cuda.Event, dict[Any, Tensor]]] = {}

    def __len__(self) -> int:
        """Number of pinned buffers allocated so far."""
        return len(self._buffers)

    def to_host(self, owner: Tensor, name: str, value: Tensor) -> Tensor:
        """Copy ``value`` into the pinned buffer of (``owner``, ``name``) and return the buffer."""
        if not self.enabled or value.device.type == HOST.type:
            return value
        buffer = self._buffers.get((id(owner), name))
        if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
            # Pinning is slow and pinned memory scarce: one buffer per tensor for the whole run.
            buffer = torch.empty(value.shape, dtype=value.dtype, device=HOST, pin_memory=True)
            self._buffers[(id(owner), name)] = buffer
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            buffer.copy_(value, non_blocking=True)
        # The device memory must not be handed out again before the side stream has read it.
        value.record_stream(self._stream)
        return buffer

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

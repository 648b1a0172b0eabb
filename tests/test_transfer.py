"""Block buffers: one host allocation per block, laid out so that every tensor is a correctly typed, aligned view."""

from __future__ import annotations

import itertools

import torch

from lightning_hift.transfer import ALIGN, BlockBuffer, Transfer, layout


def _block_values() -> dict[tuple[int, str], torch.Tensor]:
    return {
        (0, "exp_avg"): torch.randn(3, 5),
        (0, "exp_avg_sq"): torch.rand(3, 5),
        (1, "momentum"): torch.randn(7, dtype=torch.bfloat16),
        (2, "empty"): torch.zeros(0),
        (3, "counts"): torch.arange(4, dtype=torch.int64),
    }


def test_each_tensor_gets_its_own_aligned_range_and_the_buffer_is_their_exact_size() -> None:
    values = _block_values()
    slots, nbytes = layout(values)
    ranges = sorted((slot.offset, slot.offset + slot.nbytes) for slot in slots.values())
    assert all(start % ALIGN == 0 for start, _ in ranges)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(ranges))
    last = max(ranges, key=lambda r: r[1])
    assert nbytes == last[1]  # no tail: the buffer ends where its last tensor does
    padding = nbytes - sum(value.nbytes for value in values.values())
    assert 0 <= padding < ALIGN * len(values)


def test_the_views_hold_the_values_copied_in_with_their_shape_and_dtype() -> None:
    values = _block_values()
    buffer = BlockBuffer(*layout(values), pin=False)
    assert buffer.pinned_bytes == 0 and buffer.base.nbytes == layout(values)[1]
    for key, value in values.items():
        view = buffer.views[key]
        view.copy_(value)
        assert view.shape == value.shape and view.dtype == value.dtype and view.is_contiguous()
        assert view.untyped_storage().data_ptr() == buffer.base.untyped_storage().data_ptr()
    for key, value in values.items():  # no write clobbered another tensor
        assert torch.equal(buffer.views[key], value), key
    assert buffer.fits(layout(values)[0])
    assert not buffer.fits(layout({**values, (4, "new"): torch.zeros(1)})[0])


def test_on_a_cpu_device_nothing_is_copied_or_pinned() -> None:
    transfer = Transfer(torch.device("cpu"))
    values = _block_values()
    host = transfer.to_host(("state", 0), values)
    assert all(host[key] is value for key, value in values.items())
    assert len(transfer) == 0 and transfer.pinned_bytes == 0

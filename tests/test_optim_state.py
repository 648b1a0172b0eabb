"""Where optimizer state and sharded tensors rest: a shard moved to host memory stays there, and a consolidated
checkpoint gathers through the device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from lightning_hift.optim_state import gather_to_first, local, rewrap


@pytest.fixture
def one_process(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def on_an_accelerator_mesh(shard: torch.Tensor) -> DTensor:
    """A DTensor laid out over a CUDA mesh whose shard is ``shard``: what a block's optimizer state is on an
    accelerator. The mesh's backend is not set up, so no GPU is needed to make one."""
    mesh = DeviceMesh("cuda", torch.arange(1), _init_backend=False)
    spec = DTensorSpec(mesh, (Shard(0),), tensor_meta=TensorMeta(shard.shape, shard.stride(), shard.dtype))
    return DTensor(shard, spec, requires_grad=False)  # type: ignore[call-arg]


def test_a_shard_sent_to_host_memory_stays_there(one_process: None) -> None:
    # DTensor.from_local, which rewrapped before, copies a shard that is not on the mesh's device type to it: a
    # block's state came straight back to the GPU (here: fails, no CUDA), so nothing was offloaded.
    state = on_an_accelerator_mesh(torch.zeros(8, dtype=torch.bfloat16))
    host = torch.arange(8, dtype=torch.float32)
    rested = rewrap(state, host)
    assert isinstance(rested, DTensor) and local(rested).data_ptr() == host.data_ptr()  # neither copied nor moved
    assert rested.device.type == "cpu"
    assert rested.device_mesh.device_type == "cuda" and rested.placements == (Shard(0),)
    assert rested.shape == state.shape and rested.dtype == torch.float32  # a master's dtype, not the weight's


def test_a_plain_tensor_is_its_own_wrapping() -> None:
    host = torch.ones(3)
    assert rewrap(torch.zeros(3), host) is host


def test_a_consolidated_value_is_whole_in_host_memory_on_process_0(one_process: None) -> None:
    mesh = DeviceMesh("cpu", torch.arange(1))
    sharded = DTensor.from_local(torch.arange(6.0), mesh, [Shard(0)])
    gathered = gather_to_first(sharded, torch.device("cpu"))
    assert gathered is not None and not isinstance(gathered, DTensor)
    assert torch.equal(gathered, torch.arange(6.0))
    assert gather_to_first(torch.ones(2), torch.device("cpu")) is not None  # whole already: returned as it is

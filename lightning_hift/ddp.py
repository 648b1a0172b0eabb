"""HiFTDDPStrategy: HiFT on many processes and machines, with Lightning's DDP launchers and cluster environments.

Plain DistributedDataParallel cannot serve HiFT: it registers its gradient hooks once for the parameters that
require grad when it wraps the model, so switching blocks afterwards either raises or leaves gradients
unsynchronised. This strategy therefore does not wrap the model. Every process holds the whole model and its own
optimizer; the weights are broadcast from rank 0 at setup, and at each optimizer step only the active block's
gradients are averaged across processes, in flat buckets. With k blocks that is about k times less traffic than
DDP, which exchanges every gradient every step.

* A bucket's all-reduce starts during the backward of the step's last micro-batch, as soon as its gradients are
  ready and every earlier bucket has started: buckets always start in the same order on every process, so the
  collectives match. The step waits for them, then the optimizer runs.
* Micro-batches inside an accumulation window exchange nothing (Lightning's ``block_backward_sync``).
* The block order is a function of the seed and the step count, so every process activates the same block
  without talking; setup checks that all processes cut the model into the same blocks.
* Optimizer state is placed (offloaded, dropped or kept) by each process for itself. As every process holds the
  same weights and optimizer state, rank 0 saves the whole checkpoint, and it resumes on any number of processes,
  or on one with ``strategy="hift"``.

A parameter of the active block that received no gradient on some process (a branch taken on one process only,
LayerDrop) counts as zeros there, as with DDP's ``find_unused_parameters=True``, and a warning says so; one that
received none on any process keeps no gradient, so the optimizer leaves it alone, and a block without any
gradient anywhere is skipped on every process alike.
Buffers are not synchronised after setup (no ``broadcast_buffers``), so running statistics such as BatchNorm's
stay per process; ``sync_batchnorm`` is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.constants import default_pg_timeout
from typing_extensions import override

from lightning_hift import lr
from lightning_hift.blocks import Block
from lightning_hift.errors import HiFTConfigError
from lightning_hift.optim_state import OptimizerStateMode
from lightning_hift.orders import OrderName
from lightning_hift.packages import private_attribute
from lightning_hift.precision import MasterWeights
from lightning_hift.settings import HiFTSettings, OnNonfinite, document
from lightning_hift.strategy import HiFTStrategyBase
from lightning_hift.transfer import Transfer
from lightning_hift.units import LayersSpec

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
    from lightning.pytorch.accelerators import Accelerator
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import DDPStrategy as _DDPStrategy
else:
    _DDPStrategy = object


def split_into_buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Cut ``tensors`` into consecutive runs of one dtype and device, each at most ``bucket_bytes`` (or one tensor)."""
    buckets: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        current = buckets[-1] if buckets else None
        fits = current is not None and size + t.nbytes <= bucket_bytes
        if current is not None and fits and current[0].dtype == t.dtype and current[0].device == t.device:
            current.append(t)
            size += t.nbytes
        else:
            buckets.append([t])
            size = t.nbytes
    return buckets


def broadcast_from_first(tensors: Sequence[Tensor], device: torch.device, bucket_bytes: int) -> None:
    """Give every process process 0's values of ``tensors``, in buckets of at most ``bucket_bytes`` sent from
    ``device``."""
    with torch.no_grad():
        for bucket in split_into_buckets(tensors, bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket]).to(device)
            dist.broadcast(flat, src=0)
            for t, value in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
                t.copy_(value.view_as(t))


class GradientAverager:
    """Averages the gradients of one block's parameters across the processes of a group, in flat buckets.

    Buckets follow the parameters in reverse order, roughly the order in which backward produces their gradients.
    While :attr:`listening`, a hook on each parameter notes its gradient as ready, and a bucket's all-reduce starts
    once all its gradients are ready and the bucket before it has started. :meth:`finish` starts the rest, waits,
    and gives every parameter its averaged gradient, a view into the bucket.

    Each bucket carries one extra element per parameter, 1 where this process has a gradient for it: after the
    all-reduce it counts the processes that had one. A missing gradient counts as zeros in the average, and a
    parameter that no process gave a gradient keeps none. Gradients are divided by the number of processes before
    the sum, so that half-precision gradients overflow no sooner than on one process.

    Args:
        params: the block's parameters.
        bucket_bytes: the largest bucket, in bytes (a larger tensor gets a bucket of its own).
        group: the process group; the default group when None.
    """

    def __init__(self, params: Sequence[Tensor], bucket_bytes: int, group: Any = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.buckets = split_into_buckets(list(reversed(params)), bucket_bytes)
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.listening = False
        self.bytes_last_step = 0
        self.collectives_total = 0
        self.missing_here = False
        """Whether this process lacked a gradient that another process had, at the last :meth:`finish`."""
        self._missing: list[int] = []
        self._launched: list[tuple[Any, Tensor]] = []
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]

    def _reset(self) -> None:
        self._missing = [len(bucket) for bucket in self.buckets]
        self._launched = []

    def _on_grad_ready(self, p: Tensor) -> None:
        if not self.listening:
            return
        self._missing[self._bucket_of[id(p)]] -= 1
        while len(self._launched) < len(self.buckets) and self._missing[len(self._launched)] == 0:
            self._launch()

    def _launch(self) -> None:
        bucket = self.buckets[len(self._launched)]
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
        has_grad = torch.tensor([p.grad is not None for p in bucket], dtype=bucket[0].dtype, device=bucket[0].device)
        flat = torch.cat([*grads, has_grad])
        # Divided before the sum, as DDP does: a sum of W scaled fp16 gradients overflows W times sooner than their
        # average. The presence flags are summed as they are, into counts.
        flat[: -len(bucket)].div_(self.world_size)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._launched.append((work, flat))
        self.collectives_total += 1

    def finish(self) -> None:
        """Start the buckets not started yet, wait for all, and write the averaged gradients back."""
        while len(self._launched) < len(self.buckets):
            self._launch()
        self.bytes_last_step = sum(flat.nbytes for _, flat in self._launched)
        grads: list[Tensor] = []
        counts: list[Tensor] = []
        for (work, flat), bucket in zip(self._launched, self.buckets, strict=True):
            work.wait()
            *bucket_grads, bucket_counts = flat.split([*(p.numel() for p in bucket), len(bucket)])
            grads += bucket_grads
            counts.append(bucket_counts)
        # One read of the counts for the whole block: on an accelerator each read waits for the device.
        had_grad = torch.cat(counts).tolist()
        params = [p for bucket in self.buckets for p in bucket]
        self.missing_here = any(p.grad is None and n > 0 for p, n in zip(params, had_grad, strict=True))
        for p, grad, n in zip(params, grads, had_grad, strict=True):
            p.grad = grad.view_as(p) if n > 0 else None
        self._reset()

    def close(self) -> None:
        """Remove the hooks from the parameters."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class DDPHiFT(HiFTStrategyBase, _DDPStrategy):
    __doc__: str | None = document(
        """HiFT on several devices or machines: Lightning's DDP processes, without the DDP wrapper.

        Use it like ``strategy="ddp"``: ``Trainer(strategy="hift_ddp", devices=8, num_nodes=2)``, launched by
        Lightning, torchrun or SLURM. Each process trains the same block on its share of the batch; only that
        block's gradients are averaged. Every process must get the same HiFT arguments.""",
        {
            "bucket_cap_mb": "the largest all-reduce bucket, in MiB (DDP's default is 25).",
            "start_method": """how Lightning starts the processes: ``"popen"`` (runs the script again; also what
        torchrun and SLURM use), ``"spawn"`` or ``"fork"``.""",
        },
        (
            "accelerator",
            "parallel_devices",
            "cluster_environment",
            "checkpoint_io",
            "precision_plugin",
            "process_group_backend",
            "timeout",
        ),
    )

    strategy_name = "hift_ddp"

    def __init__(
        self,
        layers_per_block: int | Literal["auto"] = 1,
        order: OrderName = "bottom2up",
        seed: int = 0,
        switch_every: int = 1,
        optimizer_state: OptimizerStateMode = "offload",
        lr_update: lr.LRUpdate = "cycle",
        layers: LayersSpec = None,
        frozen: Sequence[str] | None = (),
        on_nonfinite: OnNonfinite = "skip",
        lr_scale: lr.LRScale = "blocks",
        memory_budget: int | str | None = None,
        *,
        bucket_cap_mb: float = 25.0,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise HiFTConfigError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}.")
        super().__init__(
            HiFTSettings.of(locals()),
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.bucket_bytes = int(bucket_cap_mb * 2**20)
        self.averager: GradientAverager | None = None
        self.bytes_reduced = 0
        self._sync_blocked = False
        self._warned_missing_here = False

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if private_attribute(self, "_start_method") == "spawn":
            from lightning_hift.fsdp import spawn_launcher  # fsdp builds on this module

            self._launcher = spawn_launcher(self)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if self._layer_sync is not None:
            raise HiFTConfigError(
                "strategy='hift_ddp' does not synchronise batch-norm statistics. Remove `sync_batchnorm=True`."
            )
        super().setup(trainer)

    @override
    def _sync_model_states(self) -> None:
        # What the DDP wrapper does when it wraps a model: every process starts from rank 0's weights and buffers.
        module = self.lightning_module
        assert module is not None
        self._broadcast_from_first([t.data for t in (*module.parameters(), *module.buffers())])

    @override
    def _make_masters(self, transfer: Transfer, full_values: Mapping[Tensor, Tensor]) -> MasterWeights | None:
        # The masters start from each process's own fp32 values, taken before the weights were synchronised.
        masters = super()._make_masters(transfer, full_values)
        if masters is not None:
            self._broadcast_from_first([m.data for block in self.blocks for m in masters.masters(block)])
        return masters

    def _broadcast_from_first(self, tensors: Sequence[Tensor]) -> None:
        broadcast_from_first(tensors, self.root_device, self.bucket_bytes)

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        # Lightning enters this for every micro-batch of an accumulation window but the last.
        self._sync_blocked = True
        try:
            yield None
        finally:
            self._sync_blocked = False

    @override
    def activate(self, index: int) -> None:
        if index == self.active_block:
            return
        super().activate(index)
        self.averager = GradientAverager(self.blocks[index].params, self.bucket_bytes)

    @override
    def deactivate(self) -> None:
        if self.averager is not None:
            self.averager.close()
            self.averager = None
        super().deactivate()

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        if self.averager is not None:
            self.averager.listening = not self._sync_blocked
        try:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        finally:
            if self.averager is not None:
                self.averager.listening = False

    @override
    def _reduce_grads(self, block: Block) -> None:
        assert self.averager is not None
        self.averager.finish()
        self.bytes_reduced += self.averager.bytes_last_step
        if self.averager.missing_here and not self._warned_missing_here:
            self._warned_missing_here = True
            warnings.warn(
                f"HiFT: process {self.global_rank} received no gradient for parameters of block {block.index} that"
                " other processes did (a branch taken on some processes only?); they count as zeros in the average,"
                " as with DDP's find_unused_parameters=True.",
                stacklevel=2,
            )

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        presets = {"hift_ddp": "popen", "hift_ddp_spawn": "spawn", "hift_ddp_fork": "fork"}
        cls._register_presets(strategy_registry, {name: {"start_method": method} for name, method in presets.items()})

"""HiFTFSDPStrategy: HiFT with weights, gradients and optimizer state sharded across processes (PyTorch FSDP2).

``hift`` and ``hift_ddp`` hold the whole model on every device. This strategy shards it with FSDP2
(``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy``: each process holds 1/N of
every weight, and a unit's full weights exist only while its forward or backward runs. HiFT then trains one block at
a time as on one device, and FSDP2 does the rest by itself:

* Unsharding copies ``requires_grad`` from the sharded parameters, and after backward only the parameters that have
  a gradient are reduce-scattered: the active block's, about k times less traffic than FSDP full fine-tuning.
* The optimizer holds the sharded parameters (DTensors), so its state is sharded too; the waiting blocks' shards
  rest where ``optimizer_state`` says, 1/N of the state per process.

Sharding: a module whose ``configure_model`` already applied ``fully_shard`` is used as it is. Otherwise each layer
unit, the embedding unit and the output unit get a ``fully_shard`` of their own, and the root one for what is left;
a unit that shares a parameter with another module (tied input and output embeddings) stays with the root, since
FSDP2 cannot shard one parameter in two groups. Every process starts from process 0's weights, as with DDP.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.distributed.constants import default_pg_timeout
from torch.optim import Optimizer
from typing_extensions import override

from lightning_hift import lr
from lightning_hift.ddp import broadcast_from_first
from lightning_hift.errors import HiFTConfigError
from lightning_hift.masters import MASTERS_KEY, saved_masters
from lightning_hift.optim_state import OptimizerStateMode, gather_to_first, local, rewrap, shard_like
from lightning_hift.orders import OrderName
from lightning_hift.packages import lightning_classes, private, private_attribute
from lightning_hift.precision import SHARDED_PRECISIONS, MasterWeights, all_finite
from lightning_hift.settings import HiFTSettings, OnNonfinite, document
from lightning_hift.strategy import HiFTStrategyBase
from lightning_hift.transfer import Transfer
from lightning_hift.units import LayersSpec, Unit, find_units

_BROADCAST_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket
_METADATA_FILENAME = "meta.pt"  # beside the shards: what Lightning's loader recognises a sharded checkpoint by
_NOT_THIS_MODEL = (
    "The sharded checkpoint {path} holds {what} for other parameters than this model's blocks. Resume with the model"
    " and the HiFT settings (layers_per_block, layers, frozen) that wrote it."
)

if TYPE_CHECKING:
    from lightning.pytorch.strategies import ModelParallelStrategy as _ModelParallelStrategy
else:
    _ModelParallelStrategy = object


class FSDPHiFT(HiFTStrategyBase, _ModelParallelStrategy):
    __doc__: str | None = document(
        """HiFT on several processes with the model sharded by FSDP2: ``Trainer(strategy="hift_fsdp", devices=8)``.

        Each process trains the same block on its share of the batch; the block's gradients are reduce-scattered, so
        every process steps its own shard. Every process must get the same HiFT arguments. Precision ``"32-true"``,
        ``"bf16-true"`` (bf16 weights, sharded fp32 masters of the active block, gradients summed in fp32) or
        ``"bf16-mixed"``.""",
        {
            "start_method": """how Lightning starts the processes: ``"popen"`` (runs the script again; also what
        torchrun and SLURM use), ``"spawn"`` or ``"fork"``.""",
            "save_distributed_checkpoint": """``False`` (the default): process 0 writes one consolidated
        checkpoint, which loads anywhere (``hift``, ``hift_ddp``, plain Lightning) but is gathered whole to be
        written. ``True``: every process writes its shards into a folder (torch.distributed.checkpoint), for models
        too large to gather; it resumes under ``hift_fsdp``.""",
        },
        ("process_group_backend", "timeout"),
    )

    strategy_name = "hift_fsdp"
    _shards_weights = True

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
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise HiFTConfigError(
                f"start_method must be 'popen', 'spawn', 'fork' or 'forkserver', got {start_method!r}."
            )
        super().__init__(
            HiFTSettings.of(locals()),
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.start_method = start_method

    @override
    def _configure_launcher(self) -> None:
        # The Trainer calls this once the precision plugin is known, before any process starts: the earliest check.
        _refuse_precision(self.precision_plugin)
        if self.start_method == "popen":
            super()._configure_launcher()
            return
        self._launcher = gathering_launcher(self, self.start_method)

    @override
    def setup_environment(self) -> None:
        # One data-parallel dimension over every process; tensor parallelism is not HiFT's to schedule.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    @override
    def _check_plannable(self) -> None:
        assert self.model is not None
        if _is_sharded(self.model):
            raise HiFTConfigError(
                "layers_per_block='auto' and memory_budget trace the model before hift_fsdp shards it, but"
                " configure_model has sharded it already. Let hift_fsdp shard it (remove fully_shard from"
                " configure_model), or give a fixed layers_per_block and no memory_budget."
            )

    @override
    def _prepare_model(self) -> None:
        assert self.model is not None
        _refuse_unsupported(self.model, self.precision_plugin)
        if not _is_sharded(self.model):
            if not _on_meta(self.model):
                weights = [t.data for t in (*self.model.parameters(), *self.model.buffers())]
                broadcast_from_first(weights, self.root_device, _BROADCAST_BUCKET_BYTES)
            shard_by_unit(self.model, self.device_mesh["data_parallel"], units=self._units())
        materialize = private(f"{_fabric_of(self)}.utilities.init", "_materialize_distributed_module")
        materialize(self.model, self.root_device)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a consolidated checkpoint (written by any HiFT strategy or plain Lightning) into the shards.

        Lightning's own loader insists on optimizer state for every parameter, but a block that has not had its
        first turn yet has none; here such parameters keep none, as in the run that wrote the checkpoint, and the
        waiting blocks' state goes where it rests. Each process reads the whole file and keeps its shards.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            return self._take_masters(self._load_shards(path, weights_only))
        assert self.model is not None and self.lightning_module is not None
        checkpoint: dict[str, Any] = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        load_module_state = private(f"{_fabric_of(self)}.strategies.model_parallel", "_load_raw_module_state")
        strict = self.lightning_module.strict_loading
        load_module_state(checkpoint.pop("state_dict"), self.model, self.world_size, strict=strict)
        saved = checkpoint.get("optimizer_states")
        if self.optimizers and saved and all(isinstance(key, int) for key in saved[0]["state"]):
            # Saved by index (by any HiFT strategy, or plain Lightning on one device): each process keeps its shard.
            (state,) = saved
            params = _by_index(self.optimizers[0])
            shards = {
                index: {key: _shard_like(params[index], value) for key, value in tensors.items()}
                for index, tensors in state["state"].items()
            }
            assert self.placement is not None
            self.placement.load({"state": shards, "param_groups": state["param_groups"]})
        elif self.optimizers and saved:  # keyed by parameter name: written by Lightning's ModelParallelStrategy
            (state,) = saved
            optimizer = self.optimizers[0]
            options = StateDictOptions(full_state_dict=True, strict=False)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
            # torch fills in state for every parameter before it loads; drop what the checkpoint did not have.
            for name, p in self.model.named_parameters():
                if name not in state["state"]:
                    optimizer.state.pop(p, None)
            if self.placement is not None:
                self.placement.settle()
        return self._take_masters(checkpoint)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        import torch.distributed.checkpoint as dcp

        path = Path(self.broadcast(str(filepath)))
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        # Every process writes its shards of the weights, of the optimizer state (by index) and of the fp32 masters;
        # process 0 writes the rest (loops, callbacks, hyperparameters) beside them.
        self._add_masters(checkpoint)
        shards = {"state_dict": checkpoint.pop("state_dict")}
        shards.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        if checkpoint.get(MASTERS_KEY):  # the masters as shards; the loss scale stays in the checkpoint
            masters = checkpoint[MASTERS_KEY] = dict(checkpoint[MASTERS_KEY])
            shards[MASTERS_KEY] = dict(enumerate(masters.pop("masters")))
        dcp.save(shards, checkpoint_id=path)
        if self.global_rank == 0:
            torch.save(checkpoint, path / _METADATA_FILENAME)

    def _load_shards(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        """Load a folder written with ``save_distributed_checkpoint=True``: each process reads its own shards.

        The saved optimizer state names only the parameters that had state, so the load asks for exactly those;
        torch's own loader would ask for every parameter's and fail on a block that has not had its first turn.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not (path / _METADATA_FILENAME).is_file():
            raise HiFTConfigError(f"{path} is a folder but not a sharded checkpoint (it has no {_METADATA_FILENAME}).")
        assert self.model is not None
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        wanted: dict[str, Any] = {
            "state_dict": get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=False))
        }
        if self.optimizers and any(key.startswith("optimizer_0.") for key in saved):
            optimizer = self.optimizers[0]
            params = _by_index(optimizer)
            state: dict[int, dict[str, Tensor]] = {}
            for key, meta in saved.items():
                if key.startswith("optimizer_0.state."):
                    index, name = key.removeprefix("optimizer_0.state.").split(".", 1)
                    if int(index) >= len(params):
                        raise HiFTConfigError(_NOT_THIS_MODEL.format(path=path, what="optimizer state"))
                    state.setdefault(int(index), {})[name] = _room_for(meta, params[int(index)])
            wanted["optimizer_0"] = {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
        if any(key.startswith(f"{MASTERS_KEY}.") for key in saved):
            # A half-precision run's fp32 masters: into this run's masters, or at full precision into the weights.
            if self.masters is not None:
                masters = [m for block in self.blocks for m in self.masters.masters(block)]
            else:
                masters = [p for block in self.blocks for p in block.params]
            if sum(key.startswith(f"{MASTERS_KEY}.") for key in saved) != len(masters):
                raise HiFTConfigError(_NOT_THIS_MODEL.format(path=path, what="fp32 master weights"))
            wanted[MASTERS_KEY] = {i: _room_for(saved[f"{MASTERS_KEY}.{i}"], m) for i, m in enumerate(masters)}
        dcp.load(wanted, checkpoint_id=path)
        if "optimizer_0" in wanted:
            assert self.placement is not None
            self.placement.load(wanted["optimizer_0"])
        checkpoint: dict[str, Any] = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        masters_state = saved_masters(checkpoint)
        if masters_state is not None and MASTERS_KEY in wanted:
            masters_state["masters"] = list(wanted[MASTERS_KEY].values())  # in block order, as saved
        return checkpoint

    @override
    def _sum_over_processes(self, partial: Tensor) -> Tensor:
        # Each process summed over its shards of the gradients.
        torch.distributed.all_reduce(partial)
        return partial

    @override
    def _all_finite(self, grads: list[Tensor]) -> bool:
        # Each process holds only its shard of the reduced gradients: one all-reduced verdict, so that every process
        # skips the step (or stops) together and the shards stay one model.
        held = [t for t in map(local, grads) if t.numel()]
        verdict = torch.tensor([int(not held or all_finite(held))], dtype=torch.int32, device=self.root_device)
        torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MIN)
        return bool(verdict.item())

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        # Saved by index, whole, as one process saves it, so that any HiFT strategy resumes it. (Torch's
        # module-keyed state dict could not name the fp32 masters that the optimizer steps under half precision.)
        assert self.placement is not None
        self.placement.synchronize()
        state = optimizer.state_dict()
        if self._save_distributed_checkpoint:  # each process writes its own shards
            return state
        # Gathered through the device tensor by tensor; kept on process 0 only (Lightning's convention for full
        # state dicts: the others return an empty one).
        gathered = {
            index: {
                key: gather_to_first(value, self.root_device) if isinstance(value, Tensor) else value
                for key, value in tensors.items()
            }
            for index, tensors in state["state"].items()
        }
        return state | {"state": gathered} if self.global_rank == 0 else {}

    @override
    def _make_masters(self, transfer: Transfer, full_values: Mapping[Tensor, Tensor]) -> MasterWeights | None:
        masters = super()._make_masters(transfer, full_values)
        if masters is not None:
            masters.gather = not self._save_distributed_checkpoint
        return masters

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        # Lightning enters this for every micro-batch of an accumulation window but the last: FSDP2 then adds the
        # active block's gradients up unsharded and reduce-scatters the window's sum once, at its last micro-batch.
        from torch.distributed.fsdp import FSDPModule

        assert self.model is not None
        sharded = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for module in sharded:
            module.set_requires_gradient_sync(False, recurse=False)
        try:
            yield None
        finally:
            for module in sharded:
                module.set_requires_gradient_sync(True, recurse=False)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)
        _init_fsdp_now(self.model)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        cls._register_presets(strategy_registry, {"hift_fsdp": {}, "hift_fsdp_spawn": {"start_method": "spawn"}})


def shard_by_unit(model: nn.Module, mesh: Any, layers: LayersSpec = None, units: Sequence[Unit] | None = None) -> None:
    """``fully_shard`` every HiFT unit of ``model`` that owns its parameters alone, then ``model`` itself: how
    ``hift_fsdp`` shards a module that did not shard itself. Call it from ``configure_model`` to shard a
    LightningModule the same way for Lightning's ``ModelParallelStrategy``.

    A LightningModule's ``forward`` may never be called by Lightning: its step methods are registered with FSDP2 so
    that they gather (and afterwards free) the parameters the root group holds. Gradients of bf16 weights are summed
    across processes in fp32 (then kept in bf16 until HiFT's fp32 masters take them); other precisions reduce in
    their parameters' dtype.

    Args:
        model: the module to shard (its weights the same on every process).
        mesh: a 1-D device mesh (``strategy.device_mesh["data_parallel"]``).
        layers: HiFT's ``layers`` argument, for models it cannot cut on its own.
        units: ``find_units(model, layers)`` when it is known already (``layers`` is then not read).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    shard = functools.partial(fully_shard, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    owners = _owners(model)
    for unit in units or find_units(model, layers):
        modules = _unit_modules(model, unit.param_names)
        inside = {id(m) for module in modules for m in module.modules()}
        if modules and all(owners[id(p)] <= inside for m in modules for p in m.parameters()):
            shard(modules if len(modules) > 1 else modules[0])
    shard(model)
    for method in ("training_step", "validation_step", "test_step", "predict_step"):
        if callable(getattr(model, method, None)):
            register_fsdp_forward_method(model, method)


class GatheringLauncherMixin:
    """Mixed into Lightning's launcher for spawned or forked processes: the main process gets the gathered weights.

    The stock launcher sends process 0's ``state_dict()`` back to the main process, whose module then loads it;
    sharded weights would not load into the main process's plain module.
    """

    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        module = trainer.lightning_module
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        module.state_dict = lambda *args, **kwargs: full  # what the stock launcher reads and sends (every process)
        try:
            return super()._collect_rank_zero_results(trainer, results)  # type: ignore[misc]
        finally:
            del module.state_dict


class ExitAfterExitHooksMixin:
    """Mixed into Lightning's launcher for spawned processes: each process, once its work is done and handed back,
    waits for its non-daemon threads, runs the ``atexit`` hooks and ends there, without the interpreter's final
    clean-up.

    In that clean-up gloo's worker threads, still held by FSDP2's and DDP's references to the process groups, can be
    torn down before they are joined, and the process dies with SIGABRT or SIGSEGV after training has finished.
    Forked processes already end this way (multiprocessing leaves them with ``os._exit``).
    """

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)  # type: ignore[misc]
        # Only after success: a failure propagates, and torch reports it to the main process as usual. What a normal
        # exit does first is done here too: wait for the process's other non-daemon threads, run the atexit hooks.
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        private("atexit", "_run_exitfuncs")()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(0)


def gathering_launcher(strategy: Any, start_method: str) -> Any:
    """A launcher for ``strategy`` (a model-parallel strategy of either Lightning package) that starts its processes
    with ``start_method`` (``"spawn"`` or ``"fork"``) and hands the main process the gathered full weights."""
    launcher = _launcher(_package_of(strategy), True, start_method == "spawn")
    return launcher(strategy, start_method=start_method)


def spawn_launcher(strategy: Any) -> Any:
    """Lightning's launcher for spawned processes, whose processes end without the interpreter's final clean-up
    (:class:`ExitAfterExitHooksMixin`): ``hift_ddp`` with ``start_method="spawn"``."""
    return _launcher(_package_of(strategy), False, True)(strategy, start_method="spawn")


@functools.cache
def _launcher(package: str, gather: bool, exit_early: bool) -> type:
    """``package``'s launcher for spawned or forked processes with the chosen mixins (call it with positional
    arguments only, so that every caller gets the same class); made when first used, as its
    base is a private Lightning class."""
    module = f"{package}.strategies.launchers.multiprocessing"
    private(module, "_MultiProcessingLauncher._collect_rank_zero_results")  # the methods the mixins extend
    private(module, "_MultiProcessingLauncher._wrapping_function")
    base = private(module, "_MultiProcessingLauncher")
    mixins = (GatheringLauncherMixin,) * gather + (ExitAfterExitHooksMixin,) * exit_early
    name = _launcher_name(package, gather, exit_early)
    return type(name, (*mixins, base), {"__module__": __name__, "__qualname__": name})


def _launcher_name(package: str, gather: bool, exit_early: bool) -> str:
    return f"Launcher_{package.replace('.', '_')}_{'gather' if gather else 'plain'}_{'exit' if exit_early else 'stay'}"


def __getattr__(name: str) -> Any:
    # The launcher travels to spawned processes with the strategy: pickle finds its class here by name.
    for package in ("lightning.pytorch", "pytorch_lightning"):
        for gather in (True, False):
            for exit_early in (True, False):
                if name == _launcher_name(package, gather, exit_early):
                    return _launcher(package, gather, exit_early)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _package_of(strategy: object) -> str:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``: the package whose Strategy ``strategy`` is."""
    for cls in type(strategy).__mro__:
        for package in ("lightning.pytorch", "pytorch_lightning"):
            if cls.__module__.startswith(package + "."):
                return package
    raise HiFTConfigError(f"{type(strategy).__name__} is not a Lightning strategy.")


def _fabric_of(strategy: object) -> str:
    return "lightning.fabric" if _package_of(strategy) == "lightning.pytorch" else "lightning_fabric"


def _refuse_precision(precision_plugin: Any) -> None:
    if type(precision_plugin) in lightning_classes("plugins.precision.Precision") or _bf16(precision_plugin):
        return
    raise HiFTConfigError(
        f"strategy='hift_fsdp' trains at precision {', '.join(map(repr, SHARDED_PRECISIONS))} (bf16-true is"
        f" Mixed^Hi), got {getattr(precision_plugin, 'precision', type(precision_plugin).__name__)!r}. fp16 needs"
        " loss scaling, whose overflow checks see one shard each here: use bf16, or strategy='hift_ddp' for fp16."
    )


def _bf16(precision_plugin: Any) -> bool:
    half = lightning_classes("plugins.precision.HalfPrecision") + lightning_classes("plugins.precision.MixedPrecision")
    return isinstance(precision_plugin, half) and getattr(precision_plugin, "precision", None) in SHARDED_PRECISIONS


def _refuse_unsupported(model: nn.Module, precision_plugin: Any) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise HiFTConfigError(
            "strategy='hift_fsdp' shards with FSDP2 (`torch.distributed.fsdp.fully_shard`), but the model holds"
            " modules wrapped in `FullyShardedDataParallel` (FSDP1). Remove that wrapping from `configure_model`:"
            " hift_fsdp shards the model itself, or apply `fully_shard` there instead."
        )
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            continue
        mesh = p.device_mesh
        if mesh.ndim > 1 or "tensor_parallel" in (mesh.mesh_dim_names or ()):
            raise HiFTConfigError(
                f"Parameter {name!r} is laid out on the device mesh {mesh.mesh_dim_names or mesh.shape} (tensor"
                " parallelism?). strategy='hift_fsdp' shards over one data-parallel dimension only: remove the"
                " tensor-parallel plan from `configure_model`, and shard with `fully_shard` over"
                " `self.device_mesh['data_parallel']` if you shard at all."
            )
    _refuse_precision(precision_plugin)


def _init_fsdp_now(model: nn.Module) -> None:
    """Run FSDP2's one-time set-up now, while every parameter that will ever train still requires grad.

    FSDP2 sets it up at the first forward, and reads each group's reduction dtype from its trainable parameters
    only: a unit frozen then (every block but the first, under HiFT) would have its gradients reduced in bf16 for
    the rest of the run instead of the policy's fp32. Called once the weights have their final dtype and device.
    """
    from torch.distributed.fsdp import FSDPModule

    roots: list[str] = []
    for name, module in model.named_modules():  # outer modules first
        if isinstance(module, FSDPModule) and not any(name.startswith(f"{root}.") or not root for root in roots):
            roots.append(name)
            state = private_attribute(module, "_get_fsdp_state")()  # torch 2.13 has no public call for this
            private_attribute(state, "_lazy_init")()


def _by_index(optimizer: Optimizer) -> list[Tensor]:
    """The optimizer's parameters in the order its state dict numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _room_for(meta: Any, like: Tensor) -> Tensor:
    """An empty tensor for torch.distributed.checkpoint to load a saved entry into: laid out like ``like`` (this
    process's shard) when the entry has its shape, else a plain tensor of the saved size (a ``step`` counter)."""
    dtype = meta.properties.dtype
    if tuple(meta.size) == tuple(like.shape):
        return rewrap(like, torch.empty_like(local(like), dtype=dtype))
    return torch.empty(tuple(meta.size), dtype=dtype)


def _shard_like(param: Tensor, value: Any) -> Any:
    """A whole optimizer-state tensor from a checkpoint as this process's shard of it, laid out like ``param``;
    scalars (``step``) as they are."""
    if not isinstance(value, Tensor) or value.shape != param.shape:
        return value
    return shard_like(param, value)


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _owners(model: nn.Module) -> dict[int, set[int]]:
    """For each parameter, the modules that hold it directly (more than one for a tied weight)."""
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    return owners


def _unit_modules(root: nn.Module, param_names: Sequence[str]) -> list[nn.Module]:
    """The fewest modules that hold exactly the unit's parameters: each parameter's module, merged upwards where a
    parent holds nothing but the unit's parameters."""
    wanted = set(param_names)
    paths = sorted({name.rpartition(".")[0] for name in param_names})
    chosen: list[str] = []
    for path in paths:
        # Climb while the parent's parameters all belong to the unit.
        while path:
            parent = path.rpartition(".")[0]
            names = {f"{parent}.{n}" if parent else n for n, _ in root.get_submodule(parent).named_parameters()}
            if not parent or not names <= wanted:
                break
            path = parent
        if not any(path == c or path.startswith(c + ".") for c in chosen):
            chosen = [c for c in chosen if not c.startswith(path + ".")] + [path]
    modules = [root.get_submodule(path) for path in chosen if path]
    held = {f"{path}.{n}" for path in chosen if path for n, _ in root.get_submodule(path).named_parameters()}
    return modules if held == wanted else []

"""``layers_per_block="auto"``: the largest block size whose predicted device peak fits a memory budget.

At setup a HiFT strategy reads the first training batch, and for each block size m predicts what one process holds
on its device: the weights, the active block's gradients, optimizer state and fp32 masters (with the next block's
brought ahead of its turn on CUDA), and the activations of the LightningModule's own ``training_step``, traced on
fake tensors for every block (:func:`~lightning_hift.memory.activations.saved_bytes_per_set`: no data, no device
memory). It keeps the largest m whose total fits. The same check runs for a fixed ``layers_per_block`` given a
``memory_budget``.

What is not predicted (the CUDA context, the allocator's caching and fragmentation, cuBLAS workspaces, the transient
peak inside backward) is what the default budget's margin is for.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, IterableDataset

from lightning_hift.blocks import Block, partition
from lightning_hift.checkpointing import CheckpointInputs
from lightning_hift.errors import HiFTConfigError
from lightning_hift.memory.activations import fake_like, saved_bytes_per_set
from lightning_hift.memory.plan import ACTIVATIONS, MemoryBreakdown, hift_model_state, per_process
from lightning_hift.units import Unit, find_units

DEFAULT_MARGIN = 0.10
"""The share of a CUDA device's memory the default budget leaves for what is not predicted."""
ASSUMED_STATE_BYTES = 8.0
"""Optimizer-state bytes per element assumed when an optimizer cannot be probed: AdamW's two fp32 tensors."""

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_budget(value: int | str | None) -> int | None:
    """``memory_budget`` in bytes: a whole number of bytes, or a string such as ``"20GiB"``, ``"80 GB"``, ``"512MiB"``.

    >>> parse_budget("20GiB") == 20 * 2**30, parse_budget("1.5 GB"), parse_budget(None)
    (True, 1500000000, None)
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _BUDGET.match(value) if isinstance(value, str) else None
    if match is None or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise HiFTConfigError(
            f"memory_budget must be a number of bytes or a size such as '20GiB' or '80GB', got {value!r}."
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def default_budget(device: torch.device) -> int:
    """The budget when none is given: a CUDA device's total memory less :data:`DEFAULT_MARGIN`."""
    if device.type != "cuda":
        raise HiFTConfigError(
            f"layers_per_block='auto' needs memory_budget= on {device.type!r} (only a CUDA device's size is known):"
            " pass the memory the run may use, e.g. memory_budget='20GiB', or a fixed layers_per_block."
        )
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total * (1 - DEFAULT_MARGIN))


@dataclass
class BlockSizeChoice:
    """What the budget check found: the chosen m, its predicted device bytes, and the figures of every m."""

    layers_per_block: int
    budget: int
    estimate: MemoryBreakdown
    """Bytes by kind and place of one process at the chosen m."""
    totals: dict[int, tuple[int, str]]
    """Per m: predicted device bytes and what they hold: ``"total"`` (activations included), ``"over"`` (model
    state alone, already over the budget) or ``"untraced"`` (model state; a larger m fits, so not traced)."""

    def summary(self) -> str:
        """The figures per m, for the log line."""
        said = {"total": "{}", "over": "model state {} over the budget", "untraced": "model state {}, not traced"}
        cells = []
        for m, (nbytes, what) in sorted(self.totals.items()):
            over = " over the budget" if what == "total" and nbytes > self.budget else ""
            cells.append(f"m={m} {said[what].format(size(nbytes))}{over}")
        return "; ".join(cells)


def size(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps a whole part: ``"1.50 GiB"``, ``"312.0 KiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


class BlockSizePlanner:
    """Predicts one process's device bytes per block size m for a LightningModule and its first training batch.

    Args:
        module: the LightningModule, whole (not yet sharded), on any device (meta included).
        batch: the first training batch as the loop gets it (converted, before transfer); only shapes are read.
        device: the device the run trains on (where the fake tensors claim to be).
        half: the dtype half-precision training converts weights to, or None.
        context: the precision plugin's training-step context (autocast, for mixed precision).
        layers, frozen: the strategy's arguments, for cutting blocks.
        units: ``find_units(module, layers)`` when it is known already.
        world_size, shards: processes, and whether the weights and state are split among them (``hift_fsdp``).
    """

    def __init__(
        self,
        module: nn.Module,
        batch: Any,
        device: torch.device,
        half: torch.dtype | None,
        context: Callable[[], contextlib.AbstractContextManager[Any]],
        layers: Any,
        frozen: Sequence[str],
        world_size: int = 1,
        shards: bool = False,
        units: Sequence[Unit] | None = None,
    ) -> None:
        self.module, self.batch, self.device, self.half, self.context = module, batch, device, half, context
        self.world_size, self.shards = world_size, shards
        units = units or find_units(module, layers)
        self.blocks = {1: partition(module, 1, frozen=frozen, units=units)}
        for m in range(2, len(self.blocks[1]) + 1):
            self.blocks[m] = partition(module, m, frozen=frozen, units=units)
        owned = [*module.parameters(), *module.buffers()]
        self.weight_bytes = sum(t.numel() * self._element_size(t) for t in owned)
        self.largest_unit = max(block.numel() for block in self.blocks[1])
        self._traced: dict[tuple[str, ...], int] = {}

    def _element_size(self, tensor: Tensor) -> int:
        return self.half.itemsize if self.half is not None and tensor.is_floating_point() else tensor.element_size()

    @property
    def candidates(self) -> list[int]:
        """Every block size, 1 to the number of units."""
        return sorted(self.blocks)

    def device_bytes(self, m: int, state_bytes: float, optimizer_state: str) -> MemoryBreakdown:
        """Model state (for ``optimizer_state``) without activations, as one process holds it."""
        sizes = sorted((block.numel() for block in self.blocks[m]), reverse=True)
        masters = self.half is not None
        grad_bytes = 4 if masters else self._element_size(self.blocks[m][0].params[0])
        one = MemoryBreakdown()
        one.add("params", "device", self.weight_bytes)
        prefetch = self.device.type == "cuda"
        hift_model_state(one, sizes, grad_bytes, state_bytes, optimizer_state, prefetch, masters)  # type: ignore[arg-type]
        if not self.shards:
            return one
        weight = self._element_size(self.blocks[1][0].params[0])
        return per_process(one, self.world_size, (weight + grad_bytes) * self.largest_unit)

    def batch_shapes(self) -> str:
        """The shapes of the batch's tensors, as the plan read them: ``"input_ids 16x48, labels 16"``."""
        shapes: list[str] = []

        def note(tensor: Tensor, name: str) -> None:
            shapes.append(f"{name} {'x'.join(map(str, tensor.shape)) or 'scalar'}".strip())

        def walk(value: Any, name: str) -> None:
            if isinstance(value, Tensor):
                note(value, name)
            elif isinstance(value, Mapping):
                for key, item in value.items():
                    walk(item, str(key))
            elif isinstance(value, (list, tuple)):
                for index, item in enumerate(value):
                    walk(item, f"{name}[{index}]" if name else f"[{index}]")
            elif hasattr(value, "__dataclass_fields__"):
                for key in value.__dataclass_fields__:
                    walk(getattr(value, key), key)

        walk(self.batch, "")
        return ", ".join(shapes) or "no tensors"

    def traced(self, m: int) -> bool:
        """Whether every block of size m has been traced."""
        return all(block.names in self._traced for block in self.blocks[m])

    def activations(self, m: int) -> int:
        """The most bytes the training step saves for backward with any one block of size m trainable."""
        missing = [block for block in self.blocks[m] if block.names not in self._traced]
        if missing:
            self.trace(missing)
        return max(self.block_activations(block) for block in self.blocks[m])

    def block_activations(self, block: Block) -> int:
        """The bytes the training step saves for backward with ``block`` trainable, once traced."""
        return self._traced[block.names]

    def trace(self, blocks: Sequence[Block]) -> None:
        """Trace the training step with each of ``blocks`` trainable (before the module is sharded, for FSDP)."""
        module = self.module
        # HiFT's checkpointing hooks know every unit, and each traced block under an index of its own: blocks of
        # several sizes may be traced together, and their indices repeat.
        units = len(self.blocks[1])
        traced = [dataclasses.replace(block, index=units + i) for i, block in enumerate(blocks)]
        inputs = CheckpointInputs()
        inputs.start(module, self.blocks[1] + traced)

        @contextlib.contextmanager
        def active(i: int) -> Iterator[None]:
            inputs.attach(traced[i])
            try:
                yield
            finally:
                inputs.detach()

        wrapper = _TrainingStep(module, len(_positional(module.training_step)) >= 2)  # type: ignore[arg-type]

        def step(state: Mapping[str, Tensor]) -> Tensor | None:
            batch = apply_to_collection(self.batch, Tensor, fake_like, device=self.device)
            batch = module.on_after_batch_transfer(batch, 0)  # type: ignore[operator]
            state = {f"module.{name}": value for name, value in state.items()}
            output = torch.func.functional_call(wrapper, dict(state), (batch,), strict=False)
            return output if isinstance(output, Tensor) else None

        names = [block.names for block in blocks]
        try:
            with _step_kept_apart(module, self.device):
                figures = saved_bytes_per_set(
                    module,
                    step,
                    names,
                    self.half,
                    self.device,
                    self.context,
                    active,
                    traced=f"{type(module).__name__}.training_step",
                    instead="give layers_per_block a number",
                )
        finally:
            inputs.close()
        self._traced.update(zip(names, figures, strict=True))

    def choose(
        self,
        budget: int,
        state_bytes: float,
        optimizer_state: str,
        candidates: Iterable[int] | None = None,
        traced_only: bool = False,
    ) -> BlockSizeChoice | None:
        """The largest m of ``candidates`` (all by default) whose device total fits ``budget``, or None.

        Larger m are tried first; an m whose model state alone is over the budget is not traced. With
        ``traced_only``, activations must already be traced (the module is sharded by now).
        """
        totals: dict[int, tuple[int, str]] = {}
        chosen = None
        for m in sorted(candidates or self.candidates, reverse=True):
            estimate = self.device_bytes(m, state_bytes, optimizer_state)
            if estimate.total("device") > budget:
                totals[m] = (estimate.total("device"), "over")
                continue
            if chosen is not None:
                totals[m] = (estimate.total("device"), "untraced")
                continue
            if traced_only and not self.traced(m):
                raise RuntimeError(f"block size {m} was not traced before the model was sharded")
            estimate.add(ACTIVATIONS, "device", self.activations(m))
            totals[m] = (estimate.total("device"), "total")
            if estimate.total("device") <= budget:
                chosen = BlockSizeChoice(m, budget, estimate, totals)
        return chosen

    def estimate(self, m: int, state_bytes: float, optimizer_state: str) -> MemoryBreakdown:
        """One process's device bytes at block size m, activations included."""
        estimate = self.device_bytes(m, state_bytes, optimizer_state)
        estimate.add(ACTIVATIONS, "device", self.activations(m))
        return estimate


class _TrainingStep(nn.Module):
    """The LightningModule's ``training_step`` as a forward, so that ``functional_call`` can swap its tensors."""

    def __init__(self, module: nn.Module, takes_index: bool) -> None:
        super().__init__()
        self.module = module
        self.takes_index = takes_index

    def forward(self, batch: Any) -> Any:
        args = (batch, 0) if self.takes_index else (batch,)
        output = self.module.training_step(*args)  # type: ignore[operator]
        return output.get("loss") if isinstance(output, Mapping) else output


def _positional(function: Callable[..., Any]) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return ["batch", "batch_idx"]
    return [p.name for p in parameters if p.kind in kinds]


@contextlib.contextmanager
def _step_kept_apart(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Run a traced training step without leaving a trace: logging and torchmetrics metrics off (a metric's update
    reads values, and adds nothing to backward), and after it the random states, every submodule's attributes and
    the contents of its public lists, dicts and sets as they were (a list of step outputs, a counter), and the
    training modes."""
    modes = {sub: sub.training for sub in module.modules()}
    saved = {sub: (dict(sub.__dict__), _containers(sub)) for sub in module.modules()}
    try:
        with _random_states_kept(device):
            module.__dict__.update(log=_no_log, log_dict=_no_log)
            for sub in module.modules():
                if _is_metric(sub):
                    sub.__dict__.update(forward=_no_metric, update=_no_metric)
            module.train()
            yield
    finally:
        for sub, (attributes, containers) in saved.items():
            for name in set(sub.__dict__) - set(attributes):
                del sub.__dict__[name]
            sub.__dict__.update(attributes)
            for name, contents in containers.items():
                _refill(attributes[name], contents)
        for sub, training in modes.items():
            sub.training = training


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


def _no_metric(*args: Any, **kwargs: Any) -> Tensor:
    return torch.zeros(())  # a fake scalar, inside the trace


def _is_metric(module: nn.Module) -> bool:
    """A torchmetrics ``Metric`` (told by its class, so that torchmetrics need not be installed)."""
    return any(cls.__name__ == "Metric" and cls.__module__.startswith("torchmetrics") for cls in type(module).__mro__)


def _containers(module: nn.Module) -> dict[str, Any]:
    return {
        name: list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else set(value)
        for name, value in module.__dict__.items()
        if not name.startswith("_") and type(value) in (list, dict, set)
    }


def _refill(container: Any, contents: Any) -> None:
    if isinstance(container, list):
        container[:] = contents
    else:
        container.clear()
        container.update(contents)


@contextlib.contextmanager
def _random_states_kept(device: torch.device) -> Iterator[None]:
    python = random.getstate()
    numpy_state: Any = None
    try:
        import numpy

        numpy_state = numpy.random.get_state()
    except ImportError:  # pragma: no cover (numpy comes with torch's usual installs)
        numpy = None  # type: ignore[assignment]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        if numpy is not None:
            numpy.random.set_state(numpy_state)


def first_batch(loaders: Any, device: torch.device) -> Any:
    """The first batch of training loaders (a loader, an iterable, or a collection of them), made from each
    loader's dataset, a copy of its sampler and its collate function: the loaders, their samplers (a stateful one
    included) and the random states are as they were after."""
    with _random_states_kept(device):
        return _peek(loaders)


def _peek(loaders: Any) -> Any:
    if isinstance(loaders, DataLoader):
        return _peek_loader(loaders)
    iterables = getattr(loaders, "iterables", None)
    if iterables is not None and type(loaders).__name__ == "CombinedLoader":
        return _peek(iterables)
    if isinstance(loaders, Mapping):
        return {key: _peek(value) for key, value in loaders.items()}
    if isinstance(loaders, (list, tuple)) and loaders and all(isinstance(x, DataLoader) for x in loaders):
        return type(loaders)(_peek(x) for x in loaders)
    if isinstance(loaders, Iterable):
        iterator = iter(loaders)
        if iterator is loaders:
            raise HiFTConfigError(
                f"layers_per_block='auto' reads the first training batch, but the training data is an iterator"
                f" ({type(loaders).__name__}) that would lose it. Pass a DataLoader or another iterable that can be"
                " iterated again, or a fixed layers_per_block."
            )
        return _first(iterator)
    raise HiFTConfigError(f"layers_per_block='auto' cannot read a batch from {type(loaders).__name__}.")


def _peek_loader(loader: DataLoader) -> Any:
    dataset, collate = loader.dataset, loader.collate_fn
    if isinstance(dataset, IterableDataset):
        items = iter(dataset)
        if loader.batch_size is None:
            return collate(_first(items))
        batch = list(islice(items, loader.batch_size))
        if not batch:
            _first(iter(()))
        return collate(batch)
    # A copy of the sampler (the dataset shared, not copied): a stateful sampler is not advanced.
    if loader.batch_sampler is None:  # automatic batching off: every sample is a batch
        return collate(dataset[_first(iter(copy.deepcopy(loader.sampler, {id(dataset): dataset})))])
    indices = _first(iter(copy.deepcopy(loader.batch_sampler, {id(dataset): dataset})))
    getitems = getattr(dataset, "__getitems__", None)
    return collate(getitems(indices) if callable(getitems) else [dataset[i] for i in indices])


def _first(iterator: Iterator[Any]) -> Any:
    try:
        return next(iterator)
    except StopIteration:
        raise HiFTConfigError(
            "layers_per_block='auto' reads the first training batch, but the training data is empty."
        ) from None


def state_bytes_per_element(optimizer: Optimizer, dtype: torch.dtype, device: torch.device) -> float | None:
    """Optimizer-state bytes per trained element, measured on a 64x64 probe stepped once by a new optimizer of the
    same class and the settings of its first param group; None when the class cannot be built or stepped so."""
    probe = torch.zeros(64, 64, dtype=dtype, device=device, requires_grad=True)
    cls = type(optimizer)
    settings = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        settings = {key: value for key, value in settings.items() if key in accepted}
    try:
        fresh = cls([probe], **settings)
        probe.grad = torch.full_like(probe, 1e-3)
        fresh.step()
    except Exception:  # a class that needs more than its group's settings, or another device
        return None
    tensors = [t for state in fresh.state.values() for t in state.values() if isinstance(t, Tensor) and t.numel() > 1]
    return sum(t.numel() * t.element_size() for t in tensors) / probe.numel()


def refusal(
    m: int, auto: bool, estimate: MemoryBreakdown, budget: int, half: bool, shards: bool, checkpointing: bool
) -> str:
    """The message when block size m (1 under ``"auto"``) does not fit: the figure, and what would make it fit."""
    total = estimate.total("device")
    activations = estimate.get(ACTIVATIONS, "device")
    state = total - activations - estimate.get("gathered", "device")
    ways = [] if auto or m == 1 else ["fewer layers_per_block, or layers_per_block='auto'"]
    if not checkpointing:
        ways.append("gradient checkpointing (model.gradient_checkpointing_enable() on a Hugging Face model)")
    ways.append(f"a smaller batch (activations are {size(activations)} of it)")
    if not half:
        ways.append("precision='bf16-true' (half weights, fp32 masters of the active block only)")
    if not shards and budget > activations:
        processes = max(2, math.ceil(state / (budget - activations)))
        ways.append(f"strategy='hift_fsdp' on about {processes} or more processes (weights and state split)")
    what = "layers_per_block='auto': even one unit per block" if auto else f"layers_per_block={m}"
    return (
        f"{what} needs {size(total)} on the device (model state {size(state)}, activations {size(activations)}),"
        f" over the budget of {size(budget)}."
        f" What would make it fit: {'; '.join(ways)}; or a larger memory_budget if the device has the room."
    )

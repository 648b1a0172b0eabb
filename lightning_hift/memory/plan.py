"""The planner: the model-state bytes of full fine-tuning and of HiFT, before the run, from a model or a config.

:func:`estimate_memory` predicts parameters, gradients, optimizer state and fp32 master copies by kind and by place
(device or host) on one device; :func:`estimate_per_rank` does the same per process of a multi-process run. Configs
are built on the meta device, so no weights are needed. Given a batch shape, both add the kind ``"activations"``:
what autograd saves for backward in one training forward, traced on fake tensors
(:mod:`lightning_hift.memory.activations`). Framework overhead (the CUDA context, allocator caching) and the
transient peak inside backward are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_hift import optim_state
from lightning_hift.blocks import partition
from lightning_hift.errors import HiFTConfigError
from lightning_hift.memory.activations import Batch, LossFn, activation_bytes, hf_batch
from lightning_hift.precision import SHARDED_PRECISIONS
from lightning_hift.units import find_units

GIB = 2**30
KINDS = ("params", "grads", "optimizer_state", "masters")
ACTIVATIONS = "activations"
"""The planner's kind for activations (device bytes): present when a batch shape was given."""
PLACES = ("device", "host")

STATE_TENSORS_PER_PARAM: dict[str, int] = {
    "adamw": 2,
    "adam": 2,
    "rmsprop": 1,
    "adagrad": 1,
    "sgd_momentum": 1,
    "sgd": 0,
}
"""Optimizer-state tensors the size of a parameter that each optimizer keeps (RMSprop without momentum)."""

SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": {},  # transformers' LlamaConfig defaults
    "llama2-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
    "llama2-70b": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
}
"""Model shapes the planner knows by name (LLaMA-2's published sizes), so that no config needs to be downloaded."""

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "mixed")
"""Lightning's precision names, plus ``"mixed"``: half weights with fp32 master copies of every weight and fp32
gradients on the device (Apex O2 style), the setting the HiFT paper calls mixed precision."""


@dataclass
class MemoryBreakdown:
    """Bytes by (kind, place); kinds are :data:`KINDS`, places are :data:`PLACES`."""

    bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    pinned: int = 0
    """Page-locked host bytes (CUDA): what the host's offloaded state and masters actually pin, padding included."""

    def add(self, kind: str, place: str, nbytes: int) -> None:
        self.bytes[(kind, place)] = self.bytes.get((kind, place), 0) + int(nbytes)

    def get(self, kind: str, place: str) -> int:
        return self.bytes.get((kind, place), 0)

    def total(self, place: str | None = None) -> int:
        return sum(n for (_, where), n in self.bytes.items() if place is None or where == place)

    def as_metrics(self, prefix: str = "hift/mem/") -> dict[str, float]:
        """Flat ``{prefix}{kind}_{place}`` bytes for a logger, every kind and place present, and
        ``{prefix}pinned_host``."""
        metrics = {f"{prefix}{kind}_{place}": float(self.get(kind, place)) for kind in KINDS for place in PLACES}
        return metrics | {f"{prefix}pinned_host": float(self.pinned)}


@dataclass
class MemoryEstimate:
    """The planner's answer: full fine-tuning (FPFT) and HiFT side by side."""

    num_params: int
    trainable_params: int
    largest_block: int
    num_blocks: int
    precision: str
    optimizer: str
    fpft: MemoryBreakdown
    hift: MemoryBreakdown

    def table(self) -> str:
        """A text table in GiB (2**30 bytes)."""
        lines = [
            f"{self.num_params / 1e6:,.2f} M params, {self.num_blocks} blocks,"
            f" largest {self.largest_block / 1e6:,.2f} M; optimizer {self.optimizer}, precision {self.precision}",
            f"{'GiB':<24}{'FPFT device':>12}{'HiFT device':>12}{'HiFT host':>12}",
        ]
        for kind in _kinds(self.fpft, self.hift):
            cells = (self.fpft.get(kind, "device"), self.hift.get(kind, "device"), self.hift.get(kind, "host"))
            lines.append(f"{kind:<24}" + "".join(f"{n / GIB:>12.2f}" for n in cells))
        totals = (self.fpft.total("device"), self.hift.total("device"), self.hift.total("host"))
        lines.append(f"{'total':<24}" + "".join(f"{n / GIB:>12.2f}" for n in totals))
        return "\n".join(lines)


def estimate_memory(
    model_or_config: nn.Module | Any,
    precision: str = "32-true",
    optimizer: str = "adamw",
    layers_per_block: int = 1,
    optimizer_state: str = "offload",
    layers: Any = None,
    prefetch: bool = True,
    batch_size: int | None = None,
    seq_len: int | None = None,
    batch: Batch | None = None,
    gradient_checkpointing: bool | str = False,
    loss_fn: LossFn | None = None,
) -> MemoryEstimate:
    """Predict model-state bytes of full fine-tuning and of HiFT, and their activations given a batch shape.

    Args:
        model_or_config: an ``nn.Module``, a ``transformers.PretrainedConfig``, a model folder or hub name (its
            config is read), or a name in :data:`SHAPES` (``"llama2-7b"``, ``"llama2-13b"``, ``"llama2-70b"``).
        precision: one of :data:`PRECISIONS`.
        optimizer: a key of :data:`STATE_TENSORS_PER_PARAM`.
        layers_per_block: HiFT's ``layers_per_block``.
        optimizer_state: HiFT's ``optimizer_state`` ("offload", "reset" or "keep").
        layers: HiFT's ``layers`` override, for models it cannot cut on its own.
        prefetch: count the next block's optimizer state (offloaded) and fp32 masters (half precision) that HiFT
            brings to a CUDA device while the current block trains, at most the second-largest block's; False
            counts the active block only, as the HiFT paper's table does.
        batch_size: with ``seq_len``, a Hugging Face model's batch (``input_ids`` and the ``labels`` that make its
            forward compute the loss), for the kind ``"activations"``.
        seq_len: tokens per sequence.
        batch: any model's inputs instead (a dict of keyword tensors or a tuple of positional ones; shapes and
            dtypes are read, meta tensors will do).
        gradient_checkpointing: False, True (Hugging Face's non-reentrant) or ``"reentrant"``.
        loss_fn: ``loss_fn(output, batch) -> loss`` for models whose output carries no ``loss``.

    Activations are the bytes of the distinct storages autograd saves in one training forward, the loss's
    included and the weights' own excluded: all of them for full fine-tuning; under HiFT the most over the blocks,
    each traced with only its parameters trainable (nothing below the active block is saved).

    Returns:
        The estimate; ``.table()`` formats it.

    Example:
        >>> estimate = estimate_memory("llama2-7b", precision="32-true", optimizer="adamw", prefetch=False)
        >>> round(estimate.fpft.total("device") / GIB, 2), round(estimate.hift.total("device") / GIB, 2)
        (100.41, 27.36)
    """
    if precision not in PRECISIONS:
        raise HiFTConfigError(f"Unknown precision={precision!r}. Choose one of {list(PRECISIONS)}.")
    if optimizer not in STATE_TENSORS_PER_PARAM:
        raise HiFTConfigError(f"Unknown optimizer={optimizer!r}. Choose one of {sorted(STATE_TENSORS_PER_PARAM)}.")
    optim_state.check_mode(optimizer_state)
    if not isinstance(prefetch, bool):
        raise HiFTConfigError(f"prefetch must be True or False, got prefetch={prefetch!r}.")
    model = _as_model(model_or_config)
    estimate = _estimate(model, precision, optimizer, layers_per_block, optimizer_state, layers, prefetch)
    if batch is None and (batch_size is not None or seq_len is not None):
        if batch_size is None or seq_len is None:
            raise HiFTConfigError("Give both batch_size and seq_len (or batch=) to plan activations.")
        batch = hf_batch(model, batch_size, seq_len)
    if batch is not None:
        blocks = partition(model, layers_per_block, layers=layers)
        trains = [[p for block in blocks for p in block.params], *[block.params for block in blocks]]
        figures = activation_bytes(model, batch, trains, precision, gradient_checkpointing, loss_fn)
        estimate.fpft.add(ACTIVATIONS, "device", figures[0])
        estimate.hift.add(ACTIVATIONS, "device", max(figures[1:]))
    return estimate


def _kinds(*breakdowns: MemoryBreakdown) -> tuple[str, ...]:
    planned = any(kind == ACTIVATIONS for b in breakdowns for kind, _ in b.bytes)
    return (*KINDS, ACTIVATIONS) if planned else KINDS


def _estimate(
    model: nn.Module,
    precision: str,
    optimizer: str,
    layers_per_block: int,
    optimizer_state: str,
    layers: Any,
    prefetch: bool,
) -> MemoryEstimate:
    blocks = partition(model, layers_per_block, layers=layers)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(block.numel() for block in blocks)
    sizes = sorted((block.numel() for block in blocks), reverse=True)
    largest = sizes[0]
    state = 4 * STATE_TENSORS_PER_PARAM[optimizer]
    fpft, hift = MemoryBreakdown(), MemoryBreakdown()
    half = precision in ("bf16-true", "16-true", "mixed")
    weight_bytes = 2 if half else 4
    fpft.add("params", "device", weight_bytes * total)
    hift.add("params", "device", weight_bytes * total)
    if precision in ("bf16-true", "16-true"):
        # Plain Lightning trains half weights directly: grads and optimizer state are half too, and updates
        # smaller than a half-precision step are lost. HiFT keeps fp32 masters instead (only the active block's
        # on the device) and steps them with fp32 grads.
        fpft.add("grads", "device", 2 * trainable)
        fpft.add("optimizer_state", "device", state // 2 * trainable)
    else:
        fpft.add("grads", "device", 4 * trainable)
        fpft.add("optimizer_state", "device", state * trainable)
        if precision == "mixed":
            fpft.add("masters", "device", 4 * trainable)
            hift.add("masters", "device", 4 * trainable)
    masters = precision in ("bf16-true", "16-true")
    hift_model_state(hift, sizes, 4, state, optimizer_state, prefetch, masters)
    return MemoryEstimate(total, trainable, largest, len(blocks), precision, optimizer, fpft, hift)


def hift_model_state(
    into: MemoryBreakdown,
    block_sizes: list[int],
    grad_bytes: int,
    state_bytes: int,
    optimizer_state: str,
    prefetch: bool,
    masters: bool,
) -> None:
    """Add HiFT's gradients, optimizer state and fp32 masters to ``into``: one device, the largest block active.

    Args:
        into: the breakdown to add to (weights and masters are the caller's, as they depend on the precision).
        block_sizes: elements per block, largest first.
        grad_bytes: bytes per element of the active block's gradients.
        state_bytes: optimizer-state bytes per element (8 for AdamW in fp32).
        optimizer_state: "offload", "reset" or "keep".
        prefetch: the next block's offloaded state is brought to the device while the current one trains.
        masters: half weights stepped through fp32 masters (``bf16-true``, ``16-true``): the active block's on the
            device (and the next's, with ``prefetch``), the others' on the host.
    """
    largest, trainable = block_sizes[0], sum(block_sizes)
    # The next block, on the device ahead of its turn: the active block and the next are two different blocks.
    following = block_sizes[1] if prefetch and len(block_sizes) > 1 else 0
    into.add("grads", "device", grad_bytes * largest)
    into.add("optimizer_state", "device", state_bytes * (trainable if optimizer_state == "keep" else largest))
    if optimizer_state == "offload":
        into.add("optimizer_state", "device", state_bytes * following)
        into.add("optimizer_state", "host", state_bytes * (trainable - largest))
    if masters:
        into.add("masters", "device", 4 * (largest + following))
        into.add("masters", "host", 4 * (trainable - largest))


def per_process(one: MemoryBreakdown, world_size: int, gathered: int) -> MemoryBreakdown:
    """What one of ``world_size`` FSDP processes holds of the one-device breakdown ``one``: every kind split N ways
    but activations (each process's own), plus the ``gathered`` bytes of one unit held whole for a moment."""
    split = MemoryBreakdown(pinned=_ceil_div(one.pinned, world_size))
    for (kind, place), nbytes in one.bytes.items():
        split.add(kind, place, nbytes if kind == ACTIVATIONS else _ceil_div(nbytes, world_size))
    if world_size > 1:
        split.add("gathered", "device", gathered)
    return split


def _as_model(model_or_config: nn.Module | Any) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    try:
        import transformers
    except ImportError as err:
        raise HiFTConfigError(
            "estimate_memory builds a model from a name or config with transformers, which is not installed:"
            " pip install 'lightning-hift[hf]', or pass an nn.Module (built on the meta device, for example)."
        ) from err

    config = model_or_config
    if isinstance(config, str) and config in SHAPES:
        config = transformers.LlamaConfig(**SHAPES[config])
    elif isinstance(config, str):
        config = transformers.AutoConfig.from_pretrained(config)
    if not isinstance(config, transformers.PretrainedConfig):
        raise HiFTConfigError(
            f"estimate_memory needs an nn.Module, a transformers config, a model folder or hub name; got"
            f" {type(model_or_config).__name__}."
        )
    with torch.device("meta"):
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModel):
            try:
                return auto.from_config(config)
            except ValueError:
                continue
    raise HiFTConfigError(f"transformers has no model class for model_type={config.model_type!r}.")


SHARDED_STRATEGIES = ("fsdp", "hift_ddp", "hift_fsdp")
"""What :func:`estimate_per_rank` compares: Lightning's FSDP full fine-tuning, and HiFT replicated or sharded."""


@dataclass
class PerRankEstimate:
    """Model-state bytes of one process of ``world_size``, for each of :data:`SHARDED_STRATEGIES` that trains at the
    precision (``hift_fsdp`` does not train in fp16: it is absent from ``ranks`` then).

    The kind ``"gathered"`` is what FSDP holds whole for a moment: the largest unit's weights while its forward or
    backward runs, and its gradient before the reduce-scatter.
    """

    world_size: int
    one_device: MemoryEstimate
    largest_unit: int
    ranks: dict[str, MemoryBreakdown]

    def table(self) -> str:
        """A text table in GiB (2**30 bytes) per process; a strategy that does not train at the precision shows
        ``-``."""
        one = self.one_device
        columns: list[tuple[str, str]] = [(name, "device") for name in SHARDED_STRATEGIES] + [("hift_fsdp", "host")]
        lines = [
            f"{one.num_params / 1e6:,.2f} M params, largest unit {self.largest_unit / 1e6:,.2f} M;"
            f" optimizer {one.optimizer}, precision {one.precision}; per process of {self.world_size}",
            f"{'GiB':<24}" + "".join(f"{name + ' ' + place:>18}" for name, place in columns),
        ]

        def cell(name: str, place: str, kind: str | None) -> str:
            ranks = self.ranks.get(name)
            if ranks is None:
                return f"{'-':>18}"
            nbytes = ranks.total(place) if kind is None else ranks.get(kind, place)
            return f"{nbytes / GIB:>18.2f}"

        for kind in (*_kinds(*self.ranks.values()), "gathered"):
            lines.append(f"{kind:<24}" + "".join(cell(name, place, kind) for name, place in columns))
        lines.append(f"{'total':<24}" + "".join(cell(name, place, None) for name, place in columns))
        if "hift_fsdp" not in self.ranks:
            lines.append(
                f"hift_fsdp trains at {', '.join(SHARDED_PRECISIONS)}, not {one.precision}: use bf16-true, or"
                " hift_ddp for fp16."
            )
        return "\n".join(lines)


def estimate_per_rank(
    model_or_config: nn.Module | Any,
    world_size: int,
    precision: str = "32-true",
    optimizer: str = "adamw",
    layers_per_block: int = 1,
    optimizer_state: str = "offload",
    layers: Any = None,
    prefetch: bool = True,
    batch_size: int | None = None,
    seq_len: int | None = None,
    batch: Batch | None = None,
    gradient_checkpointing: bool | str = False,
    loss_fn: LossFn | None = None,
) -> PerRankEstimate:
    """Predict each process's model-state bytes on ``world_size`` processes: Lightning's FSDP full fine-tuning,
    ``hift_ddp`` (every process holds the whole model and the active block's gradients and state) and ``hift_fsdp``
    (weights, the active block's gradients, state and masters, and the resting state all split N ways).

    Both FSDP columns add one gathered unit, its weights and its gradient, at the largest unit's size; FSDP2's
    padding of a shard (under one row per tensor) is left out. Arguments as for :func:`estimate_memory`; the batch
    is each process's, and its activations are each process's whole (FSDP shards no activations).

    Example:
        >>> fsdp = estimate_per_rank("llama2-70b", world_size=8, precision="32-true").ranks["fsdp"]
        >>> hift_fsdp = estimate_per_rank("llama2-70b", world_size=8, precision="bf16-true").ranks["hift_fsdp"]
        >>> round(fsdp.total("device") / 1e9, 1), round(hift_fsdp.total("device") / 1e9, 1)
        (144.8, 23.7)
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise HiFTConfigError(f"world_size must be a positive whole number, got {world_size!r}.")
    model = _as_model(model_or_config)
    one = estimate_memory(
        model,
        precision,
        optimizer,
        layers_per_block,
        optimizer_state,
        layers,
        prefetch,
        batch_size=batch_size,
        seq_len=seq_len,
        batch=batch,
        gradient_checkpointing=gradient_checkpointing,
        loss_fn=loss_fn,
    )
    params = dict(model.named_parameters())
    unit = max(sum(params[name].numel() for name in u.param_names) for u in find_units(model, layers))
    weight_bytes = 2 if precision in ("bf16-true", "16-true", "mixed") else 4
    grad_bytes = 2 if precision in ("bf16-true", "16-true") else 4
    gathered = (weight_bytes + grad_bytes) * unit
    ranks = {"fsdp": per_process(one.fpft, world_size, gathered), "hift_ddp": one.hift}
    if precision in SHARDED_PRECISIONS:
        ranks["hift_fsdp"] = per_process(one.hift, world_size, gathered)
    return PerRankEstimate(world_size, one, unit, ranks)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)

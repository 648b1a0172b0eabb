"""Where the bytes of fine-tuning live: a planner for before the run and a snapshot during it.

:func:`estimate_memory` and :func:`estimate_per_rank` (:mod:`lightning_hift.memory.plan`) predict the model-state
bytes of full fine-tuning and of HiFT by kind and place; :func:`snapshot` (:mod:`lightning_hift.memory.live`)
measures the same quantities on a running HiFT strategy; :mod:`lightning_hift.memory.activations` predicts and
measures what autograd saves for backward. ``python -m lightning_hift.memory MODEL`` prints the planner's table.
"""

from lightning_hift.memory.activations import activation_bytes, measure_saved_bytes
from lightning_hift.memory.live import snapshot
from lightning_hift.memory.plan import (
    GIB,
    KINDS,
    PLACES,
    PRECISIONS,
    SHAPES,
    SHARDED_STRATEGIES,
    STATE_TENSORS_PER_PARAM,
    MemoryBreakdown,
    MemoryEstimate,
    PerRankEstimate,
    estimate_memory,
    estimate_per_rank,
)

__all__ = [
    "GIB",
    "KINDS",
    "PLACES",
    "PRECISIONS",
    "SHAPES",
    "SHARDED_STRATEGIES",
    "STATE_TENSORS_PER_PARAM",
    "MemoryBreakdown",
    "MemoryEstimate",
    "PerRankEstimate",
    "activation_bytes",
    "estimate_memory",
    "estimate_per_rank",
    "measure_saved_bytes",
    "snapshot",
]

"""The HiFT arguments: one typed, validated settings object, and the text that documents each argument once.

Every HiFT strategy takes the same eleven arguments, spelled out in its own signature (LightningCLI and ``help()``
read them there) and gathered at once into a :class:`HiFTSettings`, which checks them. The strategy, the check that
every process got the same values, and the checkpoint all read that object. Adding an option means a field and its
text here, the parameter in the three strategies' signatures, and the code that uses it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, overload

from lightning_hift import lr, optim_state, orders
from lightning_hift.blocks import check_frozen
from lightning_hift.errors import HiFTConfigError
from lightning_hift.memory.budget import parse_budget
from lightning_hift.optim_state import OptimizerStateMode
from lightning_hift.orders import OrderName
from lightning_hift.units import LayersSpec, check_layers_spec

OnNonfinite = Literal["skip", "stop"]

ARGS: dict[str, str] = {
    "layers_per_block": """units (embeddings, one layer, or the output end) per block, or ``"auto"``: the
        largest block size whose predicted peak fits ``memory_budget``, chosen at setup from the shape of the first
        training batch (the module's ``training_step`` is traced on fake tensors); a resumed run keeps the block size
        of the run that wrote the checkpoint.""",
    "order": """``"bottom2up"``, ``"top2down"``, ``"random"`` (a new seeded permutation every cycle) or
        ``"grad_norm"`` (after a first bottom-up cycle, blocks drawn in proportion to their last gradient's size,
        half of each draw uniform; :class:`~lightning_hift.orders.GradNormOrder`).""",
    "seed": "seed of the random and grad_norm orders.",
    "switch_every": "optimizer steps a block stays active before the next one takes over.",
    "optimizer_state": """where inactive blocks' optimizer state lives: ``"offload"`` (host memory),
        ``"reset"`` (dropped, recreated at the block's next turn) or ``"keep"`` (stays on the device).""",
    "lr_update": """``"cycle"`` (each cycle trains at the mean of the rates the schedule gives its steps; the
        schedulers move as under plain Lightning), ``"stretched"`` (one scheduler step per cycle) or ``"step"`` (no
        delay). See :mod:`lightning_hift.lr`.""",
    "layers": """dotted path(s) to the model's repeated layers, or a callable returning them; found
        automatically for known Hugging Face families and for any model with one repeated ModuleList.""",
    "frozen": "fnmatch patterns of parameter names never trained.",
    "on_nonfinite": """what to do when the active block's gradients hold inf or NaN (without loss scaling,
        which handles overflow itself): ``"skip"`` the step, changing nothing, or ``"stop"`` training with an error.
        Either way no non-finite value reaches the weights or the optimizer state.""",
    "lr_scale": """what each step multiplies the optimizer's learning rates by: ``"blocks"`` (the number of
        blocks, k: a block is trained in 1/k of the steps, so a full fine-tuning recipe's rate moves it about as far
        over a run as full fine-tuning would) or a number (``1.0``: the rates as configured). The schedulers,
        checkpoints and ``LearningRateMonitor`` keep the configured rates; only the update uses the scaled ones.
        Param groups whose optimizer sizes its own steps (``lr=None``, Adafactor's ``relative_step=True``) are left
        as they are, with a warning.""",
    "memory_budget": """device bytes one process may use, as a number or a size such as ``"20GiB"``. With
        ``layers_per_block="auto"`` the largest block size whose predicted peak fits is chosen at setup
        (:mod:`lightning_hift.memory.budget`; on CUDA the default budget is the device's memory less 10%); with a
        number, the run stops before the first step if that block size does not fit.""",
}
"""The documentation of each HiFT argument, in signature order, as it appears in every strategy's docstring."""


LIGHTNING_ARGS: dict[str, str] = {
    "accelerator": "the accelerator; the Trainer sets it from its ``accelerator``.",
    "parallel_devices": "the devices of this machine's processes; the Trainer sets them from its ``devices``.",
    "cluster_environment": "how the processes find each other (torchrun, SLURM, ...); the Trainer chooses it.",
    "checkpoint_io": "how checkpoints are written and read; the Trainer sets it from its ``plugins``.",
    "precision_plugin": "the precision; the Trainer sets it from its ``precision``.",
    "process_group_backend": """the collectives' backend (``"nccl"``, ``"gloo"``, ...); by default NCCL on
        CUDA, gloo elsewhere.""",
    "timeout": "how long a collective may wait for the other processes before it fails.",
}
"""The documentation of the Lightning strategies' arguments that HiFT's strategies pass on as they are."""


def document(summary: str, own_args: dict[str, str], lightning: Sequence[str] = ()) -> str:
    """A strategy's docstring: ``summary``, then an ``Args:`` section listing the HiFT arguments, the strategy's own
    (``own_args``, name to text, continuation lines indented by eight spaces) and those it passes on to its Lightning
    strategy as they are (``lightning``, names in :data:`LIGHTNING_ARGS`)."""
    passed = {name: LIGHTNING_ARGS[name] for name in lightning}
    entries = [f"    {name}: {text}" for name, text in (ARGS | own_args | passed).items()]
    return f"{inspect.cleandoc(summary)}\n\nArgs:\n" + "\n".join(entries) + "\n"


@dataclass(frozen=True)
class HiFTSettings:
    """The HiFT arguments of a strategy, checked when made (:class:`~lightning_hift.errors.HiFTConfigError` if one
    is wrong). ``frozen`` is kept as a tuple and ``memory_budget`` in bytes.
    """

    layers_per_block: int | Literal["auto"] = 1
    order: OrderName = "bottom2up"
    seed: int = 0
    switch_every: int = 1
    optimizer_state: OptimizerStateMode = "offload"
    lr_update: lr.LRUpdate = "cycle"
    layers: LayersSpec = None
    frozen: Sequence[str] | None = ()
    on_nonfinite: OnNonfinite = "skip"
    lr_scale: lr.LRScale = "blocks"
    memory_budget: int | str | None = None

    RECORDED = ("optimizer_state", "layers_per_block")
    """The settings a checkpoint records (in HiFT's callback state), for the run that resumes it."""

    PER_PROCESS = ("layers", "frozen", "memory_budget")
    """The settings processes may give differently: ``layers`` and ``frozen`` are compared through the blocks they
    cut (a callable does not travel between processes), and each process plans for its own device."""

    def __post_init__(self) -> None:
        if self.layers_per_block != "auto":
            _check_positive_int("layers_per_block", self.layers_per_block, "or 'auto'")
        _check_positive_int("switch_every", self.switch_every)
        orders.check_order_name(self.order)
        optim_state.check_mode(self.optimizer_state)
        lr.check_mode(self.lr_update)
        check_layers_spec(self.layers)
        if self.on_nonfinite not in ("skip", "stop"):
            raise HiFTConfigError(f"Unknown on_nonfinite={self.on_nonfinite!r}. Choose 'skip' or 'stop'.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise HiFTConfigError(f"seed must be a whole number, got seed={self.seed!r}.")
        lr.check_scale(self.lr_scale)
        object.__setattr__(self, "memory_budget", parse_budget(self.memory_budget))
        object.__setattr__(self, "frozen", check_frozen(self.frozen))

    @classmethod
    def of(cls, arguments: dict[str, Any]) -> HiFTSettings:
        """The settings among a strategy's arguments (its ``locals()`` in ``__init__``), by name."""
        return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})

    def replace(self, **changes: Any) -> HiFTSettings:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)

    def recorded(self) -> dict[str, Any]:
        """What a checkpoint records of these settings (:data:`RECORDED`), by argument name."""
        return {name: getattr(self, name) for name in self.RECORDED}

    def shared(self) -> tuple[Any, ...]:
        """The values every process must give alike, beside the blocks they cut (all but :data:`PER_PROCESS`)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.PER_PROCESS)


HiFTSettings.__doc__ = document(HiFTSettings.__doc__ or "", {})

T = TypeVar("T")


class Setting(Generic[T]):
    """One HiFT setting as an attribute of the strategy (``strategy.order``): read from, and written (checked
    again) into, its ``settings``. ``field`` names the :class:`HiFTSettings` field when it is not the attribute's
    own name."""

    def __init__(self, field: str | None = None) -> None:
        self.field = field

    def __set_name__(self, owner: type, name: str) -> None:
        self.field = self.field or name

    @overload
    def __get__(self, strategy: None, owner: type) -> Setting[T]: ...
    @overload
    def __get__(self, strategy: object, owner: type) -> T: ...
    def __get__(self, strategy: object | None, owner: type) -> Setting[T] | T:
        if strategy is None:
            return self
        value: T = getattr(strategy.settings, self.field or "")  # type: ignore[attr-defined]
        return value

    def __set__(self, strategy: object, value: T) -> None:
        settings: HiFTSettings = strategy.settings  # type: ignore[attr-defined]
        strategy.settings = settings.replace(**{self.field or "": value})  # type: ignore[attr-defined]


def _check_positive_int(name: str, value: object, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        alternative = f" {alternative}" if alternative else ""
        raise HiFTConfigError(f"{name} must be a whole number >= 1{alternative}, got {name}={value!r}.")

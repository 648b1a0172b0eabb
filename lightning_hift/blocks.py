"""Units -> blocks: the groups of consecutive units that train together in one optimizer step.

The partition invariant: every parameter that requires grad, and that no ``frozen`` pattern names, is in
exactly one block, once (tied weights included); no block is empty. A ``frozen`` pattern names a tied or
shared parameter when it matches any of the names the parameter is registered under.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from lightning_hift.errors import HiFTConfigError
from lightning_hift.units import LayersSpec, Unit, find_units


# eq=False: comparing blocks field by field would compare tensors; a block is identified by the object itself.
@dataclass(frozen=True, eq=False)
class Block:
    """Consecutive units whose parameters are trained in the same optimizer step."""

    index: int
    """Position of the block, input side first."""
    unit_names: tuple[str, ...]
    """The units the block holds, in depth order."""
    names: tuple[str, ...]
    """Qualified parameter names."""
    params: tuple[nn.Parameter, ...]
    """The parameters, in the order of ``names``."""

    def numel(self) -> int:
        """Number of scalar parameters in the block."""
        return sum(param.numel() for param in self.params)


def partition(
    model: nn.Module,
    layers_per_block: int = 1,
    layers: LayersSpec = None,
    frozen: Sequence[str] | None = (),
    units: Sequence[Unit] | None = None,
) -> list[Block]:
    """Cut the trainable parameters of ``model`` into blocks of ``layers_per_block`` consecutive units.

    Args:
        model: A LightningModule, a Hugging Face model, or any ``nn.Module``.
        layers_per_block: Units per block (m). The last block holds the remainder, so there are
            ``ceil(units / m)`` blocks.
        layers: Where the repeated layers are; see :func:`lightning_hift.units.find_units`.
        frozen: ``fnmatch`` patterns of parameter names that are never trained, e.g. ``["*.embed_tokens.*"]``;
            see :func:`check_frozen`. A tied weight is frozen when a pattern matches any of its names.
        units: ``find_units(model, layers)`` when it is known already (``layers`` is then not read).

    Returns:
        The blocks, input side first. Parameters with ``requires_grad=False`` or named by ``frozen`` are left
        out, and so are units left without parameters.

    Raises:
        HiFTConfigError: If ``layers_per_block`` is not a positive int, ``frozen`` is not a list of patterns or
            one matches no parameter, nothing is left to train, or the layers cannot be found.

    Example:
        >>> from torch import nn
        >>> layers = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
        >>> model = nn.Sequential(nn.Embedding(10, 4), layers, nn.Linear(4, 2))
        >>> blocks = partition(model, layers_per_block=2)
        >>> [block.unit_names for block in blocks]
        [('embeddings', '1.0'), ('1.1', '1.2'), ('output',)]
        >>> blocks[2].names
        ('2.weight', '2.bias')
    """
    if isinstance(layers_per_block, bool) or not isinstance(layers_per_block, int) or layers_per_block < 1:
        raise HiFTConfigError(f"layers_per_block must be an int >= 1, got {layers_per_block!r}.")
    patterns = check_frozen(frozen)
    params = dict(model.named_parameters())
    frozen_names = _frozen_names(model, patterns)
    units = [_trainable(unit, params, frozen_names) for unit in (units or find_units(model, layers))]
    units = [unit for unit in units if unit.param_names]
    if not units:
        raise HiFTConfigError(_nothing_to_train(params, patterns))
    # ceil(units / m) groups: the last one takes the remainder, so every other group has exactly m units.
    groups = [units[start : start + layers_per_block] for start in range(0, len(units), layers_per_block)]
    return [_block(index, group, params) for index, group in enumerate(groups)]


def describe_partition(blocks: Sequence[Block]) -> str:
    """A text table of a partition (block index, units, parameter count), one row per block, for logs.

    Args:
        blocks: The result of :func:`partition`.

    Returns:
        The table, rows separated by newlines.
    """
    rows = [f"{'block':>5}  {'params':>12}  units"]
    for block in blocks:
        units = (
            block.unit_names[0] if len(block.unit_names) == 1 else f"{block.unit_names[0]} .. {block.unit_names[-1]}"
        )
        rows.append(f"{block.index:>5}  {block.numel():>12,}  {units} ({len(block.unit_names)})")
    return "\n".join(rows)


def check_frozen(frozen: Sequence[str] | None) -> tuple[str, ...]:
    """Check a ``frozen=`` argument before any model is seen, and normalise it.

    Args:
        frozen: ``fnmatch`` patterns matched against full parameter names, e.g. ``["*.embed_tokens.*"]``.
            ``None`` means nothing is frozen, like ``()``.

    Returns:
        The patterns as a tuple.

    Raises:
        HiFTConfigError: If ``frozen`` is a single string (wrap it in a list), not a sequence, or holds
            something other than strings.
    """
    if frozen is None:
        return ()
    if isinstance(frozen, str):
        raise HiFTConfigError(f"frozen={frozen!r} is a single string; pass a list of patterns: frozen=[{frozen!r}].")
    if not isinstance(frozen, Sequence):
        raise HiFTConfigError(
            f"frozen= must be a list of fnmatch patterns such as ['*.embed_tokens.*'] (or () to freeze nothing); "
            f"got {frozen!r} ({type(frozen).__name__})."
        )
    if not_patterns := [pattern for pattern in frozen if not isinstance(pattern, str)]:
        raise HiFTConfigError(
            f"frozen= lists {not_patterns[0]!r} ({type(not_patterns[0]).__name__}); every entry must be a pattern "
            "string such as '*.embed_tokens.*'."
        )
    return tuple(frozen)


def _frozen_names(model: nn.Module, patterns: tuple[str, ...]) -> set[str]:
    """Parameters (by the name ``named_parameters`` gives them) that one of ``patterns`` names by any alias."""
    first_name = {id(param): name for name, param in model.named_parameters()}
    # A tied weight is listed once, under its first name (the input embedding); users name it by either.
    aliases = [(first_name[id(param)], alias) for alias, param in model.named_parameters(remove_duplicate=False)]
    _check_patterns(patterns, [alias for _, alias in aliases])
    return {name for name, alias in aliases if _matches(alias, patterns)}


def _trainable(unit: Unit, params: dict[str, nn.Parameter], frozen_names: set[str]) -> Unit:
    names = tuple(name for name in unit.param_names if params[name].requires_grad and name not in frozen_names)
    return Unit(unit.name, names)


def _block(index: int, units: list[Unit], params: dict[str, nn.Parameter]) -> Block:
    names = tuple(name for unit in units for name in unit.param_names)
    return Block(index, tuple(unit.name for unit in units), names, tuple(params[name] for name in names))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _check_patterns(patterns: tuple[str, ...], names: list[str]) -> None:
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            examples = ", ".join(repr(name) for name in names[:3])
            raise HiFTConfigError(
                f"frozen= pattern {pattern!r} matches no parameter name (a typo?). Correct or remove it: patterns"
                f" are fnmatch-style and match the full name, e.g. {examples}."
            )


def _nothing_to_train(params: dict[str, nn.Parameter], patterns: tuple[str, ...]) -> str:
    if not any(param.requires_grad for param in params.values()):
        return (
            "No parameter of the model requires grad (all have requires_grad=False); "
            "set requires_grad=True on the parameters HiFT should train."
        )
    return (
        f"The frozen= patterns {list(patterns)!r} freeze every parameter that requires grad; "
        "narrow them so that something is left to train."
    )

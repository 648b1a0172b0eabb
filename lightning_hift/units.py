"""Model -> ordered units: the input embeddings, each repeated layer, and the output end.

The repeated layers are found, in this priority, from the user's ``layers=`` override, from the
:data:`FAMILIES` table keyed by the Hugging Face ``config.model_type``, or from a generic search for the
largest list of identical modules. Every parameter then joins exactly one unit.

A model without repeated layers (an MLP, a small CNN, an autoencoder) is cut as a last resort: one unit per
module that holds parameters itself, in registration order (a stand-in for forward order), with light
modules (norms, BatchNorm, bias-only modules, tiny embeddings) merged into a neighbour; see
:func:`find_units`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from torch import nn

from lightning_hift.errors import HiFTConfigError
from lightning_hift.packages import private

EMBEDDINGS = "embeddings"
OUTPUT = "output"

LIGHT_FRACTION = 1e-3
"""In the last-resort cut, a module with fewer parameters than this share of the largest one is light."""

_log = logging.getLogger("lightning_hift")

LayersSpec: TypeAlias = str | Sequence[str] | Callable[[nn.Module], Sequence[nn.Module]] | None


@dataclass(frozen=True)
class Unit:
    """The smallest scheduled piece of a model."""

    name: str
    """``"embeddings"``, the layer's qualified module name (e.g. ``"model.layers.3"``), or ``"output"``."""
    param_names: tuple[str, ...]
    """Qualified names as ``model.named_parameters()`` yields them (tied weights once, first name wins)."""


@dataclass(frozen=True)
class Family:
    """Where a Hugging Face model family keeps its repeated layers.

    Paths are relative to the base model (e.g. ``LlamaModel``) and matched as dotted suffixes inside the
    Hugging Face model, so one entry serves ``LlamaModel`` ("layers") and ``LlamaForCausalLM``
    ("model.layers").
    """

    layers: tuple[str, ...]
    """Containers of the repeated layers, input side first (T5: encoder blocks, then decoder blocks)."""
    output: tuple[str, ...] = ()
    """Modules registered before the layers whose parameters still belong to the output unit."""


_DECODER = Family(layers=("layers",))
_BERT_LIKE = Family(layers=("encoder.layer",))
_GPT2_LIKE = Family(layers=("h",))

FAMILIES: dict[str, Family] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": _BERT_LIKE,
    "distilbert": Family(layers=("transformer.layer",)),
    "gpt2": _GPT2_LIKE,
    "gptj": _GPT2_LIKE,
    "bloom": _GPT2_LIKE,
    "falcon": _GPT2_LIKE,
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "phi": _DECODER,
    "gpt_neox": _DECODER,
    # OPTDecoder registers its final norm and output projection before its layers.
    "opt": Family(layers=("decoder.layers",), output=("decoder.final_layer_norm", "decoder.project_out")),
    "t5": Family(layers=("encoder.block", "decoder.block")),
    # ALBERT applies one layer group at every depth: the group is a single unit, however many layers it runs.
    "albert": Family(layers=("encoder.albert_layer_groups",)),
}
"""Model-family knowledge keyed by ``config.model_type``; add an entry to teach HiFT a new family."""


@dataclass(frozen=True)
class _HFModel:
    prefix: str
    module: nn.Module
    family: Family | None


def check_layers_spec(layers: LayersSpec) -> None:
    """Check the type of a ``layers=`` argument before any model is seen.

    Args:
        layers: The value given for ``layers=``.

    Raises:
        HiFTConfigError: If ``layers`` is not ``None``, a dotted path, a non-empty sequence of dotted paths, or a
            callable (a module is refused: it is callable, but it is not a function returning the layers).
    """
    accepted = "a dotted path such as 'model.layers', a non-empty list of such paths, or a callable"
    # A module is callable, so without this check it would be called as if it were the layers function.
    if isinstance(layers, nn.Module):
        raise HiFTConfigError(
            f"layers= got a {type(layers).__name__} module; pass its dotted path (e.g. 'model.layers') "
            "or a callable that returns the layer modules."
        )
    if layers is None or isinstance(layers, str) or callable(layers):
        return
    if not isinstance(layers, Sequence) or not layers:
        raise HiFTConfigError(
            f"layers= must be {accepted} that returns the layer modules (or None to find them); "
            f"got {layers!r} ({type(layers).__name__})."
        )
    if not_paths := [path for path in layers if not isinstance(path, str)]:
        raise HiFTConfigError(
            f"layers= lists {not_paths[0]!r} ({type(not_paths[0]).__name__}); every entry must be a dotted path "
            "string such as 'model.layers'."
        )


def find_units(model: nn.Module, layers: LayersSpec = None) -> list[Unit]:
    """Split ``model`` into units ordered by depth.

    The repeated layers come from ``layers``, else from :data:`FAMILIES` for a Hugging Face model, else from
    the largest ``nn.ModuleList`` / ``nn.Sequential`` of modules of one class. A model without any is cut
    as a last resort (and says so in an INFO log line of the ``lightning_hift`` logger): one unit per module
    that holds parameters itself, in registration order, named after that module (the model's own
    parameters each after themselves). A light module, one whose parameters are all vectors (norms,
    BatchNorm, biases) or that holds less than :data:`LIGHT_FRACTION` of the largest module's parameters
    (a tiny embedding), joins the unit before it, or the one after it when none is before. A module or
    parameter registered under two names is listed once, under its first name.

    Args:
        model: A LightningModule, a Hugging Face model, or any ``nn.Module``.
        layers: Where the repeated layers are: a dotted path (or list of paths) to an ``nn.ModuleList`` /
            ``nn.Sequential`` relative to ``model`` (a unique suffix is enough), or a callable that takes
            ``model`` and returns the layer modules in depth order. ``None`` finds them automatically.

    Returns:
        ``"embeddings"`` (if it has parameters), one unit per layer, then ``"output"`` (if it has parameters);
        or, from the last-resort cut, one unit per module with parameters (light modules merged).

    Raises:
        HiFTConfigError: If the model has no parameters, ``layers`` has the wrong type, or ``layers`` does not
            point at the layers.
    """
    check_layers_spec(layers)
    if next(model.parameters(), None) is None:
        raise HiFTConfigError(
            f"The model ({type(model).__name__}) has no parameters, so HiFT has nothing to train; register the "
            "layers as attributes of the module (nn.Module or nn.Parameter) before fitting."
        )
    hf = _find_hf_model(model)
    layer_names = _layer_names(model, layers, hf)
    if not layer_names:
        return _registration_order_units(model)
    _check_layer_names(layer_names)
    return _assign(model, layer_names, _output_modules(hf))


def _layer_names(model: nn.Module, layers: LayersSpec, hf: _HFModel | None) -> list[str]:
    """The repeated layers' qualified names, or ``[]`` when the model has none."""
    if callable(layers):
        return _names_from_callable(model, layers)
    if layers is not None:
        paths = [layers] if isinstance(layers, str) else list(layers)
        return _children(model, [_resolve_path(model, path) for path in paths])
    if hf is not None and hf.family is not None:
        containers = [name for path in hf.family.layers for name in _match_in_hf(hf, path, _is_container)]
        if containers:
            return _children(model, containers)
    return _children(model, _generic_containers(model))


def _compile_wrapper() -> type:
    """The class of the module ``torch.compile(module)`` returns."""
    wrapper: type = private("torch._dynamo.eval_frame", "OptimizedModule")
    return wrapper


def _find_hf_model(model: nn.Module) -> _HFModel | None:
    # named_modules is pre-order, so the first hit is the outermost Hugging Face model.
    for name, module in model.named_modules():
        if isinstance(module, _compile_wrapper()):
            continue  # torch.compile's wrapper forwards `config` to the model inside it, the one to cut
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str):
            return _HFModel(prefix=name, module=module, family=FAMILIES.get(model_type))
    return None


def _output_modules(hf: _HFModel | None) -> list[str]:
    if hf is None:
        return []
    names = [name for path in (hf.family.output if hf.family else ()) for name in _match_in_hf(hf, path)]
    base = getattr(hf.module, "base_model", hf.module)
    if base is not hf.module:
        # A task head's own modules sit on the output side even when registered before the base model
        # (XLMRobertaForSequenceClassification registers `classifier` before `roberta`).
        names += [_join(hf.prefix, child) for child, module in hf.module.named_children() if module is not base]
    return names


def _match_in_hf(hf: _HFModel, path: str, accept: Callable[[nn.Module], bool] = lambda _: True) -> list[str]:
    """The outermost module of ``hf`` whose name ends with ``path``, as a qualified name in the user's model."""
    matches = [name for name, module in hf.module.named_modules() if _ends_with(name, path) and accept(module)]
    return [_join(hf.prefix, min(matches, key=lambda name: name.count(".")))] if matches else []


def _resolve_path(model: nn.Module, path: str) -> str:
    modules = dict(model.named_modules())
    matches = [path] if path in modules else [name for name in modules if _ends_with(name, path)]
    if not matches:
        raise HiFTConfigError(f"layers={path!r} names no submodule of the model. {_container_hint(model)}")
    if len(matches) > 1:
        raise HiFTConfigError(
            f"layers={path!r} is ambiguous: {len(matches)} module paths end with it "
            f"({', '.join(map(repr, matches[:5]))}); pass the full dotted path."
        )
    if not _is_container(modules[matches[0]]) or not list(modules[matches[0]].children()):
        found = type(modules[matches[0]]).__name__
        raise HiFTConfigError(
            f"layers={path!r} points at {matches[0]!r}, a {found}, not a non-empty nn.ModuleList or nn.Sequential "
            f"of layers. {_container_hint(model)}"
        )
    return matches[0]


def _names_from_callable(model: nn.Module, layers_fn: Callable[[nn.Module], Sequence[nn.Module]]) -> list[str]:
    name_of = {id(module): name for name, module in model.named_modules()}
    modules = list(layers_fn(model))
    if not modules:
        raise HiFTConfigError("layers= callable returned no modules; return the repeated layers in depth order.")
    names = [name_of.get(id(module), "") if isinstance(module, nn.Module) else "" for module in modules]
    for module, name in zip(modules, names, strict=True):
        if not name:
            raise HiFTConfigError(
                f"layers= callable returned a {type(module).__name__} that is not a submodule of the model; "
                "return layer modules reached from the model it receives."
            )
    return names


def _generic_containers(model: nn.Module) -> list[str]:
    repeated = [name for name, module in model.named_modules() if _is_repeated(module)]
    outer = [name for name in repeated if not any(_is_under(name, other) for other in repeated if other != name)]
    sizes = {name: _numel(model.get_submodule(name)) for name in outer}
    largest = max(sizes.values(), default=0)
    if largest == 0:
        return []
    # Half the largest keeps both stacks of an encoder-decoder while skipping small repeated parts.
    return [name for name in outer if 2 * sizes[name] >= largest]


def _assign(model: nn.Module, layer_names: list[str], output_modules: list[str]) -> list[Unit]:
    layers, outputs = set(layer_names), set(output_modules)
    params = [name for name, _ in model.named_parameters()]
    owners = [_owner(name, layers, outputs) for name in params]
    last_layer_pos = max((pos for pos, owner in enumerate(owners) if owner in layers), default=-1)
    buckets: dict[str, list[str]] = {EMBEDDINGS: [], **{name: [] for name in layer_names}, OUTPUT: []}
    current = EMBEDDINGS
    for pos, (name, owner) in enumerate(zip(params, owners, strict=True)):
        if owner is None:
            # A loose parameter between two layer lists (T5's encoder.final_layer_norm) ends the layer before it.
            owner = OUTPUT if pos > last_layer_pos else current
        elif owner != OUTPUT:
            current = owner
        buckets[owner].append(name)
    units = [Unit(name, tuple(names)) for name, names in buckets.items()]
    return [unit for unit in units if unit.param_names or unit.name not in (EMBEDDINGS, OUTPUT)]


def _registration_order_units(model: nn.Module) -> list[Unit]:
    params = dict(model.named_parameters())
    pieces = _pieces_by_owner(list(params))
    largest = max(_piece_numel(piece, params) for piece in pieces)
    light = [_is_light(piece, params, largest) for piece in pieces]
    units = _merge_light(pieces, light)
    _log.info(
        "%s has no repeated layers (no nn.ModuleList or nn.Sequential of modules of one class), so HiFT cut it "
        "into %d units in registration order, norms and other light modules merged into a neighbour: %s. "
        "To choose the layers, pass layers='dotted.path' or a callable that returns the layer modules.",
        type(model).__name__,
        len(units),
        ", ".join(unit.name for unit in units),
    )
    return units


def _pieces_by_owner(param_names: list[str]) -> list[Unit]:
    """One piece per module that holds parameters itself; ``named_parameters`` lists each one's together."""
    owners: dict[str, list[str]] = {}
    for name in param_names:
        # The model's own parameters (no dot in the name) have no module to be named after but themselves.
        owner = name.rpartition(".")[0] or name
        owners.setdefault(owner, []).append(name)
    return [Unit(owner, tuple(names)) for owner, names in owners.items()]


def _piece_numel(piece: Unit, params: dict[str, nn.Parameter]) -> int:
    return sum(params[name].numel() for name in piece.param_names)


def _is_light(piece: Unit, params: dict[str, nn.Parameter], largest: int) -> bool:
    # A unit of its own would spend a whole optimizer step of every cycle on next to nothing.
    vectors_only = all(params[name].dim() < 2 for name in piece.param_names)
    return vectors_only or _piece_numel(piece, params) < LIGHT_FRACTION * largest


def _merge_light(pieces: list[Unit], light: list[bool]) -> list[Unit]:
    units: list[Unit] = []
    leading: tuple[str, ...] = ()  # light pieces before the first heavy one wait to join it
    for piece, is_light in zip(pieces, light, strict=True):
        if not is_light:
            units.append(Unit(piece.name, leading + piece.param_names))
            leading = ()
        elif units:
            units[-1] = Unit(units[-1].name, units[-1].param_names + piece.param_names)
        else:
            leading += piece.param_names
    # Only light pieces (a lone LayerNorm): nothing to merge them into, so they are one unit together.
    return units or [Unit(pieces[0].name, leading)]


def _owner(param_name: str, layers: set[str], outputs: set[str]) -> str | None:
    prefixes = [param_name[:pos] for pos, char in enumerate(param_name) if char == "."]
    if layer := next((prefix for prefix in prefixes if prefix in layers), None):
        return layer
    return OUTPUT if any(prefix in outputs for prefix in prefixes) else None


def _check_layer_names(names: list[str]) -> None:
    if len(set(names)) < len(names):
        raise HiFTConfigError("layers= lists a layer more than once; list each layer module once.")
    for name in names:
        if inner := next((other for other in names if _is_under(other, name)), None):
            raise HiFTConfigError(f"layers= lists {inner!r} inside {name!r}; layers must not contain each other.")


def _children(model: nn.Module, containers: list[str]) -> list[str]:
    return [_join(name, child) for name in containers for child, _ in model.get_submodule(name).named_children()]


def _container_hint(model: nn.Module) -> str:
    found = [
        name for name, module in model.named_modules() if _is_container(module) and len(list(module.children())) > 1
    ]
    if not found:
        return "The model has no module list; pass layers= a callable that returns its repeated layers in depth order."
    listed = ", ".join(repr(name) for name in found[:5])
    return f"Pass the path of the model's repeated layers as layers=; module lists found in the model: {listed}."


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def _is_repeated(module: nn.Module) -> bool:
    children = list(module.children())
    return _is_container(module) and len(children) >= 2 and len({type(child) for child in children}) == 1


def _numel(module: nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


def _ends_with(name: str, path: str) -> bool:
    return name == path or name.endswith("." + path)


def _is_under(name: str, prefix: str) -> bool:
    return name != prefix and (prefix == "" or name.startswith(prefix + "."))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name

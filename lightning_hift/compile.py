"""A compiled model under HiFT: one compiled region per unit instead of one for the whole model.

Dynamo guards every compiled graph on the ``requires_grad`` of the tensors it reads, parameters included. A graph
of the whole model is therefore valid for one active block only: every block switch recompiles it, and after
``torch._dynamo.config.recompile_limit`` graphs (8) dynamo gives up and runs the model eagerly for the rest of
training. A graph of one unit depends only on that unit's own state (its parameters frozen or trainable, its
input requiring grad or not, training or evaluation), so each unit compiles a few graphs during the first cycle
and none after it. This is the regional compilation PyTorch recommends for models built of repeated layers.

When fitting starts, :func:`compile_by_unit` finds where the user compiled a module that holds units:

* ``trainer.fit(torch.compile(model))``: Lightning hands the strategy the LightningModule with its ``forward``
  and ``*_step`` methods replaced by compiled ones (``lightning.pytorch.utilities.compile.from_compiled``);
* ``self.model = torch.compile(self.model)``: an ``OptimizedModule`` inside the LightningModule, whose compiled
  ``forward`` sits on the wrapper;
* ``model.compile()`` / ``self.model.compile()``: compiled in place (``nn.Module._compiled_call_impl``);
* ``@torch.compile`` on a ``forward`` or ``*_step`` method of the class.

For the fit it puts the original, eager calls back, and compiles each unit that is a module (each repeated layer)
on its own, with the dynamo context the user compiled with: the same backend, mode, options, ``fullgraph`` and
``dynamic``. The code between the units (embedding lookups, masks, the final norm and head, the loss) runs
eagerly. :meth:`CompiledByUnit.restore` undoes it all when the fit ends. Modules and parameter names are left as
they are, so checkpoints keep their keys. Compiled modules that hold no unit module (a compiled head, a compiled
layer) are left as the user compiled them: each of their graphs sees only the few states of one unit.
"""

from __future__ import annotations

import inspect
import logging
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from torch import nn

from lightning_hift.errors import HiFTConfigError
from lightning_hift.packages import private, private_attribute
from lightning_hift.units import EMBEDDINGS, OUTPUT, LayersSpec, Unit, find_units

Compiler: TypeAlias = Callable[[Callable[..., Any]], Callable[..., Any]]
"""A dynamo context as ``torch.compile`` makes it: called on a function, it returns the function compiled."""

COMPILED_ATTRIBUTES = (
    "_compiled_call_impl",
    "forward",
    "training_step",
    "validation_step",
    "test_step",
    "predict_step",
)
"""Where a module can hold a compiled call: ``module.compile()``, a compiled forward, Lightning's compiled steps."""

_log = logging.getLogger("lightning_hift")


@dataclass
class CompiledByUnit:
    """What :func:`compile_by_unit` changed, to be undone when the fit ends."""

    units: list[str]
    """The units compiled each on its own, by module name."""
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def restore(self) -> None:
        """Put back the user's compiled calls and leave the units uncompiled; calling it again does nothing."""
        while self._undo:
            self._undo.pop()()


def compile_by_unit(
    model: nn.Module, layers: LayersSpec = None, units: Sequence[Unit] | None = None
) -> CompiledByUnit | None:
    """If the user compiled a module that holds units, compile each unit on its own instead, for the fit.

    Args:
        model: The LightningModule (or any ``nn.Module``) being fitted.
        layers: The strategy's ``layers=``, to cut ``model`` into the same units as its blocks.
        units: ``find_units(model, layers)`` when it is known already (``layers`` is then not read).

    Returns:
        What was changed (undo it with :meth:`CompiledByUnit.restore`), or ``None`` when nothing compiled holds a
        unit and the model is left as it is.

    Raises:
        HiFTConfigError: If a call that holds units was compiled in a way whose options cannot be read back.
    """
    compiled = {name: module for name, module in model.named_modules() if _compiled_attributes(module)}
    if not compiled:  # the common case: no compilation, nothing to cut the model for
        return None
    unit_modules = _unit_modules(model, units or find_units(model, layers))
    holders = {name: module for name, module in compiled.items() if any(_holds(name, unit) for unit in unit_modules)}
    if not holders:
        return None
    result = CompiledByUnit(units=[])
    compilers = {name: _run_eagerly(module, result._undo) for name, module in holders.items()}
    for name, unit in unit_modules.items():
        if _compiled_attributes(unit):
            continue  # the user compiled this unit already: it is a region of its own
        holder = max((holder for holder in compilers if _holds(holder, name)), key=len)  # the innermost one's options
        result._undo.append(_compile_unit(unit, name, compilers[holder]))
        result.units.append(name)
    if result.units:
        _log.info(
            "HiFT compiles the model unit by unit (%d units, e.g. %s) with the options it was compiled with: a graph of"
            " the whole model would recompile at every block switch. The code between the units runs eagerly.",
            len(result.units),
            ", ".join(result.units[:3]),
        )
    return result


def _unit_modules(model: nn.Module, units: Sequence[Unit]) -> dict[str, nn.Module]:
    """The units that are modules (the layers), by name; the embeddings and the output end are sets of parameters."""
    modules = dict(model.named_modules())
    names = [unit.name for unit in units if unit.name not in (EMBEDDINGS, OUTPUT)]
    return {name: modules[name] for name in names if name in modules}


def _compiled_attributes(module: nn.Module) -> list[str]:
    # getattr_static: OptimizedModule forwards unknown attributes to the module it wraps, which has its own entry.
    return [name for name in COMPILED_ATTRIBUTES if _compiler_of(inspect.getattr_static(module, name, None))]


def _compiler_of(call: object) -> Compiler | None:
    """The dynamo context that compiled ``call``, or ``None`` when ``call`` is not a compiled function."""
    if not callable(call) or not hasattr(call, "_torchdynamo_orig_callable"):
        return None
    if getattr(call, "_torchdynamo_disable", False):
        return None  # torch.compiler.disable marks functions the same way, to keep them out of graphs
    dynamo_context = private("torch._dynamo.eval_frame", "_TorchDynamoContext")
    contexts = [value for value in _closure_values(call) if isinstance(value, dynamo_context)]
    if not contexts:
        raise HiFTConfigError(
            f"HiFT cannot read how {getattr(call, '__qualname__', call)!r} was compiled, so it cannot compile the"
            " model unit by unit, and a graph of the whole model would recompile at every block switch. Compile"
            " the model with torch.compile(model) or model.compile() before trainer.fit, or do not compile it."
        )
    # torch._dynamo.run (RunOnlyContext) marks functions too, but runs what was compiled before without compiling.
    compiling = private("torch._dynamo.eval_frame", "OptimizeContext")
    return contexts[0] if isinstance(contexts[0], compiling) else None


def _closure_values(function: object) -> list[object]:
    # torch.compile returns a closure over the context it made: the only place the options live after the call.
    values = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # a cell not filled yet
            continue
    return values


def _run_eagerly(module: nn.Module, undo: list[Callable[[], None]]) -> Compiler:
    """Put back the eager calls of ``module`` for the fit; returns the context it was compiled with."""
    compilers: list[Compiler] = []
    for attribute in _compiled_attributes(module):
        call = inspect.getattr_static(module, attribute)
        compilers.append(_compiler_of(call))  # type: ignore[arg-type]  # not None: _compiled_attributes checked
        undo.append(_set_for_fit(module, attribute, _eager(module, attribute, call)))
    # A module compiled more than one way (rare) lends its units the options of the last way found.
    return compilers[-1]


def _eager(module: nn.Module, attribute: str, call: Callable[..., Any]) -> Callable[..., Any] | None:
    if attribute == "_compiled_call_impl":
        return None  # nn.Module.__call__ then runs the module's own forward
    original = private_attribute(call, "_torchdynamo_orig_callable")
    # A compiled method on the class (a decorator) holds the plain function: bind it to this module.
    return original if attribute in vars(module) else types.MethodType(original, module)


def _set_for_fit(module: nn.Module, attribute: str, value: object) -> Callable[[], None]:
    """Set ``module.attribute`` to ``value``; returns how to put back exactly what was there."""
    had_own = attribute in vars(module)
    previous = vars(module).get(attribute)
    setattr(module, attribute, value)

    def undo() -> None:
        if had_own:
            setattr(module, attribute, previous)
        else:  # it came from the class: drop the instance's copy to uncover it
            delattr(module, attribute)

    return undo


def _compile_unit(unit: nn.Module, name: str, compiler: Compiler) -> Callable[[], None]:
    private("torch.nn", "Module._compiled_call_impl")  # what nn.Module.__call__ runs instead of forward when set
    # Not unit.compile(compiler's options): that compiles Module._call_impl, a frame dynamo skips for torch.nn's own
    # modules (a layer that is an nn.Sequential would silently stay eager), and whose one code object every module
    # shares. Dynamo keeps graphs and counts them against recompile_limit per code object, so the region gets a code
    # object of its own: one layer's graphs (specialised on its state and on integer attributes such as
    # layer_idx) then never count against another's.
    region = _region(private_attribute(unit, "_call_impl"), "hift_unit_" + re.sub(r"\W", "_", name))
    return _set_for_fit(unit, "_compiled_call_impl", compiler(region))


def _region(call: Callable[..., Any], code_name: str) -> Callable[..., Any]:
    def region(*args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    region.__code__ = region.__code__.replace(co_name=code_name)
    return region


def _holds(holder: str, unit: str) -> bool:
    """Whether the module named ``holder`` contains the unit module named ``unit`` (and is not that module)."""
    return holder != unit and (holder == "" or unit.startswith(holder + "."))

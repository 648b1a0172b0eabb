"""The two Lightning packages: ``lightning.pytorch`` and the older ``pytorch_lightning``.

They are separate class trees with the same code. HiFT's mechanism is written once, as mixins that name no
Lightning class at run time; :mod:`lightning_hift.pytorch` and :mod:`lightning_hift.pytorch_lightning` bind
it to each package's ``Strategy`` and ``Callback``. Where the mechanism must recognise a Lightning object (a
precision plugin, a callback), it asks this module for the class of that name in every package in use.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from typing import Any

from lightning_hift.errors import HiFTConfigError

PACKAGES: tuple[str, ...] = ("lightning.pytorch", "pytorch_lightning")


def lightning_classes(path: str) -> tuple[type, ...]:
    """The class at ``path`` (e.g. ``"plugins.precision.HalfPrecision"``) in each Lightning package imported so far.

    A package that is not imported cannot have made the object being checked, so it is not imported here.

    Raises:
        HiFTConfigError: when an imported package has no class at ``path`` (an upgrade renamed it), rather than HiFT
            failing to recognise the object and behaving otherwise.
    """
    found: list[type] = []
    for package_name in PACKAGES:
        package = sys.modules.get(package_name)
        if package is None:
            continue
        found_class: object = package
        for name in path.split("."):
            found_class = getattr(found_class, name, None)
        if not isinstance(found_class, type):
            raise _missing(f"{package_name}.{path}")
        found.append(found_class)
    return tuple(found)


# --- names HiFT relies on that their owners do not promise to keep ---------------------------------------------------

FABRIC_OF = {"lightning.pytorch": "lightning.fabric", "pytorch_lightning": "lightning_fabric"}
"""Each Lightning package's Fabric: the strategies of one call the other's utilities."""

PRIVATE_NAMES: tuple[tuple[str, str, str], ...] = (
    ("{pl}.strategies.launchers.multiprocessing", "_MultiProcessingLauncher", "hift_fsdp's spawn launcher extends it"),
    (
        "{pl}.strategies.launchers.multiprocessing",
        "_MultiProcessingLauncher._collect_rank_zero_results",
        "hift_fsdp gathers the sharded weights for the main process there",
    ),
    (
        "{pl}.strategies.launchers.multiprocessing",
        "_MultiProcessingLauncher._wrapping_function",
        "spawned processes end after the atexit hooks, before the interpreter's clean-up",
    ),
    ("atexit", "_run_exitfuncs", "the same"),
    ("{fabric}.utilities.init", "_materialize_distributed_module", "hift_fsdp materialises a meta-device model"),
    ("{fabric}.strategies.model_parallel", "_load_raw_module_state", "hift_fsdp loads a consolidated checkpoint"),
    ("torch.distributed.fsdp", "FSDPModule._get_fsdp_state", "FSDP2's one-time set-up, run early (hift_fsdp)"),
    ("torch.distributed.fsdp._fully_shard._fsdp_state", "FSDPState._lazy_init", "the same set-up"),
    ("torch._dynamo.eval_frame", "OptimizeContext", "torch.compile's options, to compile unit by unit"),
    ("torch._dynamo.eval_frame", "_TorchDynamoContext", "the same"),
    ("torch._dynamo.eval_frame", "OptimizedModule", "torch.compile's wrapper, looked through to find the units"),
    ("torch.nn", "Module._call_impl", "a unit is compiled through its call"),
    ("torch.nn", "Module._compiled_call_impl", "where module.compile() leaves the compiled call"),
    ("torch._subclasses.fake_tensor", "FakeTensorMode", "the planner traces a forward without weights"),
    ("torch.cuda.memory", "_record_memory_history", "the GPU check records one cycle's allocations"),
    ("torch.cuda.memory", "_dump_snapshot", "the same, written to experiments/results"),
)
"""``(module, attribute path, why)`` of every private module-level or class-level name the package uses, looked up
through :func:`private`; ``{pl}`` and ``{fabric}`` stand for each installed Lightning package and its Fabric."""

PRIVATE_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("{pl}.plugins.precision.HalfPrecision", "_desired_input_dtype", "tells fp16 (loss scaling) from bf16"),
    ("torch.distributed.tensor.DTensor", "_local_tensor", "sharded state and masters rest in host memory"),
    ("torch.distributed.tensor.DTensor", "_spec", "a host shard is wrapped without a copy to the device"),
    ("torch.nn.Module (compiled)", "_torchdynamo_orig_callable", "a compiled call is run eagerly for the fit"),
    ("{pl}.strategies.DDPStrategy", "_start_method", "hift_ddp's spawned processes get the early-exit launcher"),
    ("{pl}.loops.FitLoop", "_data_source", "layers_per_block='auto' asks it for the training loaders to read a batch"),
    ("transformers.PreTrainedModel", "_require_grads_hook", "HF gradient checkpointing's input hook is taken over"),
)
"""``(owner, attribute, why)`` of every private instance attribute the package reads, through
:func:`private_attribute` or, where the attribute's absence is itself meaningful, ``getattr`` with a default;
``tests/test_packaging.py`` checks each on an instance."""


def private(module: str, attribute: str) -> Any:
    """``attribute`` (a dotted path) of ``module``: a name HiFT relies on that its owner keeps private.

    Raises:
        HiFTConfigError: naming the name and the installed version of its package, when an upgrade removed or moved
            it, instead of HiFT falling back to other behaviour.
    """
    found: Any
    try:
        found = importlib.import_module(module)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as err:
        raise _missing(f"{module}.{attribute}") from err
    return found


def private_attribute(owner: object, name: str) -> Any:
    """``owner.name``, a private attribute HiFT relies on (an instance's, such as a precision plugin's input dtype),
    failing loudly like :func:`private` when it is not there."""
    try:
        return getattr(owner, name)
    except AttributeError as err:
        raise _missing(f"{type(owner).__module__}.{type(owner).__qualname__}.{name}") from err


def _missing(name: str) -> HiFTConfigError:
    package = name.split(".")[0]
    return HiFTConfigError(
        f"lightning_hift relies on {name}, which the installed {package} {_version(package)} does not have: an"
        f" upgrade removed or moved it. Install a {package} version that lightning_hift supports (pyproject.toml"
        " states the tested range), or report it with this message."
    )


def _version(package: str) -> str:
    for name in (package, package.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return str(getattr(sys.modules.get(package), "__version__", "(version unknown)"))

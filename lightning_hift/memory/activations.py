"""Activation bytes: what autograd keeps for backward during one training forward, for any model.

One forward runs under ``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd saves is noted by its
storage, and the distinct storages are summed, the parameters' and buffers' own storage excluded. The same hook serves
the prediction and the measurement:

- :func:`activation_bytes` (predicted) runs the forward on fake tensors (shapes and dtypes, no data), so a 7B or 70B
  config plans without weights;
- :func:`measure_saved_bytes` (measured) runs the model's own forward on its real tensors.

What trains decides what is saved: under HiFT only the active block's parameters require grad, so nothing below the
block is saved; :func:`activation_bytes` takes the sets of parameters that train.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from lightning_hift.errors import HiFTConfigError
from lightning_hift.packages import private

HALF = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "mixed": torch.float16}
"""Precisions that train half weights: parameters, buffers and floating inputs in this dtype."""
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""Precisions that keep fp32 weights and run the forward under autocast (CPU autocast's op lists)."""
CHECKPOINTING = (False, True, "reentrant")
"""``gradient_checkpointing``: off, Hugging Face's non-reentrant checkpointing, or its reentrant one."""

MEASURE_INSTEAD = "measure a small real model with measure_saved_bytes instead"

Batch = Mapping[str, Tensor] | tuple[Tensor, ...]
LossFn = Callable[[Any, Any], Tensor]


def hf_batch(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, Tensor]:
    """A training batch for a Hugging Face model: ``input_ids`` and, where its forward takes them, ``labels``
    (one per sequence for sequence classification, one per token otherwise), so that the forward computes its
    loss. Zeros on the meta device: planning reads shapes and dtypes only."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HiFTConfigError(f"{name} must be a whole number >= 1, got {name}={value!r}.")
    if getattr(model, "config", None) is None:
        raise HiFTConfigError(
            f"{type(model).__name__} is not a Hugging Face model: pass batch= (its inputs: a dict of keyword"
            " tensors or a tuple of positional ones; meta tensors will do) instead of batch_size and seq_len."
        )
    batch = {"input_ids": torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")}
    if "labels" in inspect.signature(model.forward).parameters:
        per_sequence = type(model).__name__.endswith("ForSequenceClassification")
        shape = (batch_size,) if per_sequence else (batch_size, seq_len)
        batch["labels"] = torch.zeros(shape, dtype=torch.long, device="meta")
    return batch


def activation_bytes(
    model: nn.Module,
    batch: Batch,
    trainable: Iterable[Iterable[nn.Parameter]] | None = None,
    precision: str = "32-true",
    gradient_checkpointing: bool | str = False,
    loss_fn: LossFn | None = None,
) -> list[int]:
    """Predicted bytes of the distinct storages autograd saves in one training forward (loss included), per set.

    Args:
        model: any module; its weights are not read (a meta-device model will do).
        batch: the forward's inputs, a dict of keyword tensors or a tuple of positional ones; only their shapes and
            dtypes are read (meta tensors will do).
        trainable: sets of the model's parameters; for each set, a forward in which only those require grad. None:
            one set, the parameters that require grad now (full fine-tuning).
        precision: a Lightning precision name, or ``"mixed"``; half precisions convert weights, buffers and
            floating inputs, ``*-mixed`` runs under CPU autocast.
        gradient_checkpointing: False, True (Hugging Face's non-reentrant) or ``"reentrant"``; set for the trace
            and put back after.
        loss_fn: ``loss_fn(output, batch) -> loss``; by default the output's ``loss`` if it has one, else the sum
            of its first tensor (which saves nothing more).

    Returns:
        One byte count per set in ``trainable``.
    """
    if gradient_checkpointing not in CHECKPOINTING:
        raise HiFTConfigError(
            f"gradient_checkpointing must be one of {list(CHECKPOINTING)}, got {gradient_checkpointing!r}."
        )
    if precision not in (*HALF, *AUTOCAST, "32-true"):
        raise HiFTConfigError(f"Unknown precision={precision!r} for tracing activations.")
    everything = [[p for p in model.parameters() if p.requires_grad]]
    sets = [list(group) for group in trainable] if trainable is not None else everything
    names = {id(p): name for name, p in model.named_parameters()}
    for group in sets:
        if any(id(p) not in names for p in group):
            raise HiFTConfigError("activation_bytes: a trainable set holds a tensor that is not a parameter of model.")
    dtype = HALF.get(precision)
    autocast = AUTOCAST.get(precision)

    def step(state: Mapping[str, Tensor]) -> Tensor:
        inputs = _fake_batch(batch, dtype)
        return _loss(_call(model, inputs, dict(state)), inputs, loss_fn)

    def context() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()

    trains = [{names[id(p)] for p in group} for group in sets]
    with _training(model, gradient_checkpointing):
        return saved_bytes_per_set(model, step, trains, dtype, context=context)


def measure_saved_bytes(
    model: nn.Module, batch: Batch, precision: str = "32-true", loss_fn: LossFn | None = None
) -> int:
    """What autograd actually saves in one forward of ``model`` as it is (its weights, dtype, ``requires_grad``,
    training mode and checkpointing), on real tensors: the figure :func:`activation_bytes` predicts. ``precision``
    only chooses autocast (``*-mixed``); convert a half-precision model and its inputs yourself."""
    own = [*model.parameters(), *model.buffers()]
    autocast = AUTOCAST.get(precision)
    with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
        return _saved_bytes(lambda: _loss(_call(model, batch), batch, loss_fn), own)


def saved_bytes_per_set(
    model: nn.Module,
    step: Callable[[Mapping[str, Tensor]], Any],
    trainable: Sequence[Iterable[str]],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    around: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
    traced: str = "The model's forward",
    instead: str = MEASURE_INSTEAD,
) -> list[int]:
    """The bytes autograd saves in ``step`` for each set of trainable parameter names, traced on fake tensors.

    The building block of :func:`activation_bytes` and of ``layers_per_block="auto"``, for callers with their own
    training step.

    Args:
        model: the module whose parameters and buffers ``step`` uses (a meta-device model will do).
        step: ``step(state) -> loss``: one training forward with ``state`` (name -> fake tensor) in place of the
            model's parameters and buffers (:func:`torch.func.functional_call`); it makes its inputs with
            :func:`fake_like`, as it runs inside the fake mode.
        trainable: per trace, the names of the parameters that require grad.
        dtype: the floating dtype of the fake parameters and buffers (None: each tensor's own).
        device: where the fake tensors claim to be (nothing is allocated there).
        context: entered around each trace (autocast, a precision plugin's training-step context).
        around: ``around(i)`` entered around the ``i``-th trace (hooks that depend on what trains).
        traced, instead: what runs and what to do instead, for the message when the trace fails.

    Returns:
        One byte count per set: the distinct storages saved for backward, the parameters' and buffers' excluded.
    """
    figures = []
    with _fake_tensors(traced, instead):
        for i, names in enumerate(trainable):
            trains = set(names)
            state = {n: fake_like(t, dtype, device).requires_grad_(n in trains) for n, t in model.named_parameters()}
            state |= {name: fake_like(t, dtype, device) for name, t in model.named_buffers()}
            with around(i) if around is not None else contextlib.nullcontext(), context():
                figures.append(_saved_bytes(lambda: step(state), list(state.values())))  # noqa: B023 (called at once)
    return figures


def _call(model: nn.Module, batch: Batch, state: dict[str, Tensor] | None = None) -> Any:
    args, kwargs = ((), dict(batch)) if isinstance(batch, Mapping) else (tuple(batch), {})
    if state is None:
        return model(*args, **kwargs)
    return torch.func.functional_call(model, state, args, kwargs, strict=False)


def _saved_bytes(run: Callable[[], Any], own: list[Tensor]) -> int:
    excluded = {StorageWeakRef(t.untyped_storage()) for t in own}
    saved: dict[StorageWeakRef, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        saved.setdefault(StorageWeakRef(storage), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(nbytes for ref, nbytes in saved.items() if ref not in excluded)


def fake_like(value: Any, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Any:
    """Inside the fake mode of :func:`saved_bytes_per_set`: a tensor with ``value``'s shape, and ``dtype`` if it is
    floating (else its own), on ``device`` (else its own, meta taken as the CPU); anything else as it is."""
    if not isinstance(value, Tensor):
        return value
    dtype = dtype if dtype is not None and value.is_floating_point() else value.dtype
    if device is None:
        device = "cpu" if value.device.type == "meta" else value.device
    return torch.empty(value.shape, dtype=dtype, device=device)  # shape and dtype, no data


def _fake_batch(batch: Batch, dtype: torch.dtype | None) -> Batch:
    if isinstance(batch, Mapping):
        return {key: fake_like(value, dtype, "cpu") for key, value in batch.items()}
    return tuple(fake_like(value, dtype, "cpu") for value in batch)


def _loss(output: Any, batch: Any, loss_fn: LossFn | None) -> Tensor:
    if loss_fn is not None:
        return loss_fn(output, batch)
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    first = output if isinstance(output, Tensor) else next((v for v in _values(output) if isinstance(v, Tensor)), None)
    if first is None:
        raise HiFTConfigError(
            f"Cannot find a tensor in the model's output ({type(output).__name__}) to make a loss of: pass loss_fn."
        )
    return first.float().sum()


def _values(output: Any) -> Iterable[Any]:
    if isinstance(output, Mapping):
        return output.values()
    if isinstance(output, (tuple, list)):
        return output
    return ()


@contextlib.contextmanager
def _fake_tensors(traced: str = "The model's forward", instead: str = MEASURE_INSTEAD) -> Iterator[None]:
    fake_mode = private("torch._subclasses.fake_tensor", "FakeTensorMode")
    try:
        # Real tensors the step meets (a tensor attribute that is no buffer) become fake copies: never written to.
        with fake_mode(allow_non_fake_inputs=True):
            yield
    except HiFTConfigError:
        raise
    except Exception as err:  # an op that reads values (a data-dependent shape, .item()) cannot run without data
        raise HiFTConfigError(
            f"{traced} failed while traced on fake tensors ({type(err).__name__}: {err}). If the error is about"
            " the model or its inputs, fix those; if it reads values (a data-dependent shape, .item()), it cannot"
            f" be traced without data: {instead}."
        ) from err


@contextlib.contextmanager
def _training(model: nn.Module, checkpointing: bool | str) -> Iterator[None]:
    """Training mode and the requested gradient checkpointing for the trace; the model's own settings after."""
    modes = {module: module.training for module in model.modules()}
    was_checkpointing = bool(
        getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False))
    )
    if checkpointing and not any(hasattr(model, f"{n}_checkpointing_enable") for n in ("activation", "gradient")):
        raise HiFTConfigError(
            f"gradient_checkpointing={checkpointing!r} uses Hugging Face's activation_checkpointing_enable"
            f" (gradient_checkpointing_enable before transformers 5), which {type(model).__name__} lacks; trace your"
            " own checkpointed module with gradient_checkpointing=False."
        )
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        _hugging_face_checkpointing(model, True, {"use_reentrant": reentrant})
        if reentrant:
            # As the strategy does: the embeddings' output requires grad, so blocks above frozen ones still train.
            model.enable_input_require_grads()  # type: ignore[operator]
    elif was_checkpointing:
        _hugging_face_checkpointing(model, False)
    model.train()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        if checkpointing == "reentrant":
            model.disable_input_require_grads()  # type: ignore[operator]
        if checkpointing and not was_checkpointing:
            _hugging_face_checkpointing(model, False)
        elif was_checkpointing and not checkpointing:
            _hugging_face_checkpointing(model, True)


def _hugging_face_checkpointing(model: nn.Module, enable: bool, kwargs: dict[str, Any] | None = None) -> None:
    """Switch a Hugging Face model's checkpointing by the name its transformers version gives the switch:
    ``activation_checkpointing_*`` (transformers 5, which deprecates the older name) or ``gradient_checkpointing_*``."""
    current = hasattr(model, "activation_checkpointing_enable")
    name = f"{'activation' if current else 'gradient'}_checkpointing_{'enable' if enable else 'disable'}"
    switch = getattr(model, name)
    if enable:
        switch(**{f"{'activation' if current else 'gradient'}_checkpointing_kwargs": kwargs})
    else:
        switch()

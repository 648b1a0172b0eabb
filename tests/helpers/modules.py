"""A tiny LightningModule and the callbacks the strategy tests use to watch training."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from transformers.optimization import Adafactor

from lightning_hift.memory import snapshot
from tests.helpers.lightning import Callback, LightningModule, Trainer
from tests.helpers.tiny_models import TinyMLPStack

VOCAB, WIDTH, CLASSES, SEQ = 32, 16, 4, 6


def tiny_stack(num_layers: int = 4) -> TinyMLPStack:
    """Embeddings, ``num_layers`` identical layers, a norm and a classifier head: ``num_layers + 2`` units."""
    return TinyMLPStack(vocab_size=VOCAB, width=WIDTH, num_layers=num_layers, classes=CLASSES)


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.1)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, initial_accumulator_value=0.1)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "adafactor":
        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    if name == "sam":
        return SAM(params, lr=lr, rho=0.05)
    raise ValueError(name)


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization over SGD, written as its published implementations are: ascend from w to
    w + rho * g / |g| (over the parameters that have a gradient), zero the gradients, call the closure again, return
    to w and step with the gradient found there.

    With ``passes`` > 2 it ascends again from each new gradient before the last call: an optimizer that calls its
    closure any number of times. ``calls`` keeps, for every closure call, each stepped tensor's value during the call
    and the gradient the call left it: ``{tensor: (value, grad)}``.
    """

    def __init__(self, params: Any, lr: float, rho: float = 0.05, passes: int = 2) -> None:
        super().__init__(params, {"lr": lr, "rho": rho})
        self.passes = passes
        self.calls: list[dict[Tensor, tuple[Tensor, Tensor]]] = []

    def _with_grad(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _note(self) -> None:
        self.calls.append({p: (p.detach().clone(), p.grad.detach().clone()) for p in self._with_grad()})  # type: ignore[union-attr]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        assert closure is not None, "SAM needs the closure"
        with torch.enable_grad():
            loss = closure()
        start = {p: p.detach().clone() for p in self._with_grad()}
        for _ in range(self.passes - 1):
            self._note()
            params = self._with_grad()
            norm = torch.stack([p.grad.norm() for p in params]).norm()  # type: ignore[union-attr]
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=group["rho"] / float(norm + 1e-12))
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
        self._note()
        for group in self.param_groups:
            for p in group["params"]:
                if p in start:
                    p.copy_(start[p])
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        return loss


def warmup_then_linear(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class TinyModule(LightningModule):
    """Classifies random token sequences; optimizer and schedule chosen by name."""

    def __init__(
        self,
        optimizer: str = "adamw",
        lr: float = 1e-2,
        schedule: tuple[int, int] | None = None,
        num_layers: int = 4,
        samples: int = 64,
        batch_size: int = 4,
    ) -> None:
        super().__init__()
        self.net = tiny_stack(num_layers)
        self.optimizer_name, self.lr, self.schedule = optimizer, lr, schedule
        generator = torch.Generator().manual_seed(1234)
        tokens = torch.randint(0, VOCAB, (samples, SEQ), generator=generator)
        labels = torch.randint(0, CLASSES, (samples,), generator=generator)
        self.data = TensorDataset(tokens, labels)
        self.batch_size = batch_size

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, labels = batch
        return nn.functional.cross_entropy(self.net(tokens), labels)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def configure_optimizers(self) -> Any:
        optimizer = make_optimizer(self.optimizer_name, self.parameters(), self.lr)
        if self.schedule is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(*self.schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit(
    module: LightningModule,
    strategy: Any,
    max_steps: int,
    callbacks: list[Callback] | None = None,
    **trainer_kwargs: Any,
) -> Trainer:
    trainer = quiet_trainer(strategy=strategy, max_steps=max_steps, callbacks=callbacks or [], **trainer_kwargs)
    trainer.fit(module)
    return trainer


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or sanity check; ``kwargs`` override."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**(options | kwargs))


class StepRecorder(Callback):
    """Records what each micro-batch did, in lists with one entry a micro-batch: ``lrs``, the first param group's
    rate as the batch starts; ``changed``, the names of the parameters it changed; ``stepped``, whether the optimizer
    stepped; under a HiFT strategy ``active``, the active block, and after the batch ``places``, where each block's
    optimizer state rests, and ``has_state``, whether it has any. ``update_lrs`` has one entry per update: the rate
    the optimizer steps at (under HiFT the configured rate times ``lr_scale``), a number even where it is a tensor.

    Where asked: ``grads``, each parameter's gradient as the update is about to apply it, by name ({} where no update
    ran); ``weights``, the parameters after the batch, by name; ``state``, the optimizer's state tensors after the batch
    (step counters left out); ``memory``, the strategy's :func:`~lightning_hift.memory.snapshot` after the batch
    (placed before HiFTCallback, it sees the trained block's gradients and state before the switch).
    """

    def __init__(self, grads: bool = False, weights: bool = False, state: bool = False, memory: bool = False) -> None:
        self.keep = {"grads": grads, "weights": weights, "state": state, "memory": memory}
        self.active: list[int | None] = []
        self.lrs: list[Any] = []
        self.update_lrs: list[Any] = []
        self.changed: list[set[str]] = []
        self.stepped: list[bool] = []
        self.places: list[list[str]] = []
        self.has_state: list[list[bool]] = []
        self.grads: list[dict[str, Tensor]] = []
        self.weights: list[dict[str, Tensor]] = []
        self.state: list[dict[str, Tensor]] = []
        self.memory: list[Any] = []
        self._before: dict[str, Tensor] = {}
        self._step = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.active.append(getattr(trainer.strategy, "active_block", None))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self._before = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        self._step = trainer.global_step
        if self.keep["grads"]:
            self.grads.append({})

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        lr = optimizer.param_groups[0]["lr"]
        self.update_lrs.append(float(lr) if isinstance(lr, Tensor) else lr)
        if self.keep["grads"]:
            self.grads[-1] = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        params = dict(pl_module.named_parameters())
        self.changed.append({name for name, p in params.items() if not torch.equal(p, self._before[name])})
        self.stepped.append(trainer.global_step != self._step)
        strategy: Any = trainer.strategy
        state = trainer.optimizers[0].state
        if hasattr(strategy, "blocks"):
            self.places.append([strategy.placement.where(b) for b in strategy.blocks])
            self.has_state.append([all(state.get(p) for p in b.params) for b in strategy.blocks])
        if self.keep["weights"]:
            self.weights.append({name: p.detach().clone() for name, p in params.items()})
        if self.keep["state"]:
            kept = {f"{id(p)}.{k}": v.clone() for p, s in state.items() for k, v in s.items() if k != "step"}
            self.state.append(kept)
        if self.keep["memory"]:
            self.memory.append(snapshot(strategy))


class SkipOnce(Sampler[int]):
    """The given indices in order; the first pass starts at the ``skip``-th (the rest of an interrupted epoch)."""

    def __init__(self, indices: range, skip: int) -> None:
        self.indices, self.skip = indices, skip

    def __iter__(self) -> Iterator[int]:
        start, self.skip = self.skip, 0
        return iter(self.indices[start:])

    def __len__(self) -> int:
        return len(self.indices)


class ResumableTinyModule(TinyModule):
    """Starts a resumed epoch at the first batch the interrupted run had not trained on."""

    def train_dataloader(self) -> DataLoader:
        # Checkpoints taken in on_train_batch_end count that batch as processed, not yet as completed; one taken at
        # an epoch's end has processed the whole epoch, and the resumed run starts the next one from its start.
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed % -(-len(self.data) // self.batch_size)
        sampler = SkipOnce(range(len(self.data)), done * self.batch_size)
        return DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)

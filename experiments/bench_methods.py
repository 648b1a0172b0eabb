"""The methods experiments/benchmark.py compares (the task's LightningModule with each one's optimizer, strategy and
callbacks), and how each one's device memory is counted (the rule of bench_protocol.md)."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LambdaCallback
from lightning.pytorch.strategies import Strategy
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_hift import HiFTCallback, HiFTStrategy, find_units, partition
from lightning_hift.blocks import Block
from lightning_hift.memory import snapshot
from lightning_hift.optim_state import OptimizerStatePlacement
from lightning_hift.tasks import CausalLanguageModel, SequenceClassifier
from lightning_hift.tasks.optim import OptimizerFactory, linear_warmup_decay
from lightning_hift.units import EMBEDDINGS, OUTPUT

PEER_PACKAGES = {"badam": "badam", "lora": "peft", "galore": "galore_torch", "adalomo": "lomo_optim"}
TASKS = {"classifier": SequenceClassifier, "causal_lm": CausalLanguageModel}


def tensor_bytes(value: Any) -> int:
    """Bytes of a tensor, a list or tuple of them, or an object holding them (GaLore's projector)."""
    if isinstance(value, Tensor):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return sum(tensor_bytes(item) for item in vars(value).values() if isinstance(item, (Tensor, list, tuple)))
    return 0


def state_bytes(state: Mapping[Any, Mapping[str, Any]], keys: Iterable[Any] | None = None) -> int:
    """Bytes of an ``optimizer.state`` (its entries for ``keys`` if given), ``step`` counters left out."""
    entries = state.values() if keys is None else (state.get(key, {}) for key in keys)
    return sum(tensor_bytes(value) for entry in entries for name, value in entry.items() if name != "step")


def present_grads(module: nn.Module) -> tuple[int, int]:
    present = [p for p in module.parameters() if p.grad is not None]
    return sum(p.grad.nbytes for p in present if p.grad is not None), sum(p.numel() for p in present)


@dataclass
class MethodRun:
    """One method's module, strategy and callbacks, and how its gradients, optimizer state (device, host) and extra
    weight copies on the device are read; ``facts``: settings derived at run time, for the record."""

    module: LightningModule
    description: str
    strategy: str | Strategy = "auto"
    callbacks: list[Callback] = field(default_factory=list)
    grads: Callable[[nn.Module], tuple[int, int]] = present_grads
    optimizer_state: Callable[[Trainer], tuple[int, int]] = lambda trainer: (
        state_bytes(trainer.optimizers[0].state),
        0,
    )
    masters: Callable[[Trainer], int] = lambda trainer: 0
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hyper:
    """What every method of a run shares (BAdam's advice on its switching interval depends on ``examples``)."""

    task: str
    lr: float
    weight_decay: float
    warmup_ratio: float
    batch_size: int
    seed: int
    examples: int

    def module(self, model: nn.Module, optimizer: OptimizerFactory) -> LightningModule:
        settings = {"lr": self.lr, "weight_decay": self.weight_decay, "warmup_ratio": self.warmup_ratio}
        return TASKS[self.task](model, optimizer=optimizer, **settings)  # type: ignore[arg-type]


def build(model: nn.Module, cfg: DictConfig, hyper: Hyper) -> MethodRun:
    """The method of config entry ``cfg`` on the freshly loaded ``model``; ImportError if a peer is not installed."""
    full = "AdamW over every parameter, every step (Lightning's default strategy)"
    builders = {"hift": _hift, "badam": _badam, "lisa": _lisa, "lora": _lora, "galore": _galore, "adalomo": _adalomo}
    builders["full"] = lambda model, cfg, hyper: MethodRun(hyper.module(model, torch.optim.AdamW), full)
    if cfg.kind not in builders:
        raise ValueError(f"Unknown method kind={cfg.kind!r} in the benchmark config; use one of {sorted(builders)}.")
    return builders[cfg.kind](model, cfg, hyper)


def _hift(model: nn.Module, cfg: DictConfig, hyper: Hyper) -> MethodRun:
    # Only what the entry sets; everything else is the package's default.
    keys = ("layers_per_block", "order", "optimizer_state", "lr_scale", "memory_budget")
    strategy = HiFTStrategy(seed=hyper.seed, **{key: cfg[key] for key in keys if key in cfg})
    facts: dict[str, Any] = {}
    # The benchmark puts its own callbacks first, so that they measure a step before HiFT switches.
    callbacks: list[Callback] = [HiFTCallback(log_memory=False)]
    if strategy.auto_block_size:
        # Chosen at setup; the record gets the choice and the planner's figure.
        def chosen(trainer: Trainer, pl_module: LightningModule) -> None:
            assert strategy.memory_estimate is not None
            facts.update(layers_per_block=strategy.layers_per_block, blocks=len(strategy.blocks))
            facts["planned_device_bytes"] = strategy.memory_estimate.total("device")

        callbacks.append(LambdaCallback(on_train_start=chosen))
        blocks_text, scale = f"layers_per_block='auto' at a budget of {cfg['memory_budget']}", "k x"
    else:
        blocks = len(partition(model, strategy.layers_per_block))  # type: ignore[arg-type]
        blocks_text = f"{blocks} blocks of {strategy.layers_per_block} unit(s)"
        scale = f"{blocks}x" if strategy.lr_scale == "blocks" else f"{strategy.lr_scale}x"

    def optimizer_state(trainer: Trainer) -> tuple[int, int]:
        # Only the active block's state is on the device; offloaded state is host memory.
        breakdown = snapshot(strategy)
        return breakdown.get("optimizer_state", "device"), breakdown.get("optimizer_state", "host")

    description = (
        f"HiFTStrategy with AdamW: {blocks_text}, {strategy.order}, optimizer_state={strategy.optimizer_state_mode},"
        f" lr_update={strategy.lr_update}, lr_scale={strategy.lr_scale!r} (each update at {scale} the rate)"
    )
    module = hyper.module(model, torch.optim.AdamW)
    return MethodRun(module, description, strategy, callbacks, optimizer_state=optimizer_state, facts=facts)


def _badam(model: nn.Module, cfg: DictConfig, hyper: Hyper) -> MethodRun:
    from badam import BlockOptimizer

    class LightningBlockOptimizer(BlockOptimizer):  # type: ignore[misc]  # badam ships no type information
        """Runs Lightning's closure before its step (which copies the gradients to its fp32 block first); keeps what
        it held right after the update, since a block switch drops the optimizer state."""

        step_state_bytes = step_master_bytes = 0

        def step(self, closure: Callable[[], Any] | None = None) -> Any:
            with torch.enable_grad():
                loss = closure() if closure is not None else None
            self.step_state_bytes = self.step_master_bytes = 0
            super().step()
            self._record_step_memory()
            return loss

        def switch_trainable_params(self, verbose: int | None = None) -> None:
            self._record_step_memory()
            # It prints the new block at every switch unless told otherwise here (the constructor's `verbose` not).
            super().switch_trainable_params(self.verbose if verbose is None else verbose)

        def _record_step_memory(self) -> None:
            self.step_state_bytes = max(self.step_state_bytes, state_bytes(self.base_optimizer.state))
            copies = getattr(self, "param_idx2hp", {}).values()
            self.step_master_bytes = max(self.step_master_bytes, sum(copy.nbytes for copy in copies))

    units = partition(model, layers_per_block=1)
    switch_every = cfg.switch_block_every
    if switch_every == "auto":  # BAdam's advice: K = min(max(n / (B * D), 50), 100)
        switch_every = min(max(hyper.examples // (hyper.batch_size * len(units)), 50), 100)
    # The task head: parameters outside the base model (a classifier's `classifier.*`; none for a tied LM head).
    base_prefix = f"{getattr(model, 'base_model_prefix', '')}."
    head = [name for name, _ in model.named_parameters() if not name.startswith(base_prefix)]

    def block_optimizer(groups: list[dict[str, Any]], lr: float) -> Optimizer:
        with warnings.catch_warnings():
            # Every method trains fp32 weights here; the report counts the fp32 copy this warning is about.
            warnings.filterwarnings("ignore", message="BAdam expect model to be loaded in fp16")
            return LightningBlockOptimizer(
                base_optimizer=torch.optim.AdamW(groups, lr=lr),
                named_parameters_list=list(model.named_parameters()),
                # Full parameter names: BlockOptimizer matches its prefixes as substrings of the names.
                block_prefix_list=[list(block.names) for block in units],
                switch_block_every=switch_every,
                switch_mode=cfg.switch_mode,
                active_modules=head,
                verbose=0,
            )

    description = (
        f"badam.BlockOptimizer over AdamW: {len(units)} blocks (the HiFT units), switch every {switch_every} step(s)"
        + (" (BAdam's advice min(max(n / (batch * blocks), 50), 100))" if cfg.switch_block_every == "auto" else "")
        + f", {cfg.switch_mode}; the head ({len(head)} tensors) always trains, as BAdam advises for a freshly"
        " initialised head; at each switch BAdam drops the optimizer state, copies the new block to fp32 and runs"
        " gc.collect()"
    )
    return MethodRun(
        hyper.module(model, block_optimizer),
        description,
        optimizer_state=lambda trainer: (trainer.optimizers[0].step_state_bytes, 0),
        masters=lambda trainer: int(trainer.optimizers[0].step_master_bytes),
        facts={"switch_every": switch_every},
    )


class LisaCallback(Callback):
    """LISA (as LMFlow's trainer callback defines it) on this project's units: embeddings and output always train;
    every ``interval`` steps ``layers`` random layers become the only trainable ones. A frozen layer's optimizer
    state is kept (LMFlow's behaviour), offloaded or reset, as HiFT's ``optimizer_state`` says."""

    def __init__(self, layers: int, interval: int, seed: int, optimizer_state: str = "keep") -> None:
        if layers < 1 or interval < 1:
            raise ValueError(f"LISA needs layers >= 1 and interval >= 1; got layers={layers}, interval={interval}.")
        self.layers, self.interval, self.optimizer_state = layers, interval, optimizer_state
        self.rng = random.Random(seed)
        self.placement: OptimizerStatePlacement | None = None
        self.blocks: list[Block] = []
        self.candidates: list[Block] = []
        self.active: list[Block] = []
        self._drawn_at = -1

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.blocks = partition(pl_module, layers_per_block=1)
        always = [block for block in self.blocks if block.unit_names[0] in (EMBEDDINGS, OUTPUT)]
        self.candidates = [block for block in self.blocks if block not in always]
        if len(self.candidates) < self.layers:
            raise ValueError(f"LISA samples {self.layers} layers but the model has {len(self.candidates)}.")
        device = trainer.strategy.root_device
        self.placement = OptimizerStatePlacement(self.optimizer_state, trainer.optimizers[0], self.blocks, device)
        self._train(self.candidates, False, move=False)
        for block in always:
            self.placement.to_device(block)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.interval == 0 and step != self._drawn_at:
            self._drawn_at = step
            self._train(self.active, False)
            self.active = self.rng.sample(self.candidates, self.layers)
            self._train(self.active, True)

    def _train(self, blocks: list[Block], trainable: bool, move: bool = True) -> None:
        assert self.placement is not None
        for block in blocks:
            if move and trainable:
                self.placement.to_device(block)
            for p in block.params:
                p.requires_grad_(trainable)
                if not trainable:
                    p.grad = None
            if move and not trainable:
                self.placement.to_rest(block)

    def placed_state(self, trainer: Trainer) -> tuple[int, int]:
        assert self.placement is not None
        state, where = self.placement.optimizer.state, self.placement.where
        device, host = (
            sum(state_bytes(state, b.params) for b in self.blocks if where(b) == p) for p in ("device", "host")
        )
        return device, host


def _lisa(model: nn.Module, cfg: DictConfig, hyper: Hyper) -> MethodRun:
    callback = LisaCallback(cfg.layers, cfg.interval, hyper.seed, cfg.optimizer_state)
    description = (
        f"AdamW; embeddings and output unit always train, {cfg.layers} random layers every {cfg.interval}"
        f" steps; frozen layers' optimizer state: {cfg.optimizer_state}"
        + (" (never freed, as in LMFlow)" if cfg.optimizer_state == "keep" else "")
    )
    module = hyper.module(model, torch.optim.AdamW)
    return MethodRun(module, description, callbacks=[callback], optimizer_state=callback.placed_state)


def _lora(model: nn.Module, cfg: DictConfig, hyper: Hyper) -> MethodRun:
    from peft import LoraConfig, TaskType, get_peft_model

    peft_task = {"classifier": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM}[hyper.task]
    settings = {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout}
    config = LoraConfig(task_type=peft_task, target_modules=list(cfg.target_modules), **settings)
    # For sequence classification peft trains the head in full (modules_to_save); the encoder stays frozen.
    wrapped = get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    description = (
        f"peft LoRA r={cfg.r}, alpha={cfg.alpha}, dropout={cfg.dropout} on {', '.join(cfg.target_modules)};"
        f" head trained in full; {trainable / 1e6:.2f} M trainable parameters; not full-parameter"
    )
    return MethodRun(hyper.module(wrapped, torch.optim.AdamW), description)


def _galore(model: nn.Module, cfg: DictConfig, hyper: Hyper) -> MethodRun:
    from galore_torch import GaLoreAdamW

    layers = [unit for unit in find_units(model) if unit.name not in (EMBEDDINGS, OUTPUT)]
    params = dict(model.named_parameters())
    names = {name for unit in layers for name in unit.param_names}
    projected = {id(params[name]) for name in names if params[name].dim() == 2}
    projection = {"rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap, "scale": cfg.scale, "proj_type": "std"}

    def galore_adamw(groups: list[dict[str, Any]], lr: float) -> Optimizer:
        # Each weight-decay group splits into its projected matrices and the rest; GaLore projects a group's
        # parameters when the group carries a rank.
        split = []
        for group in groups:
            rest = [p for p in group["params"] if id(p) not in projected]
            low_rank = [p for p in group["params"] if id(p) in projected]
            split += [{**group, "params": rest}] if rest else []
            split += [{**group, "params": low_rank, **projection}] if low_rank else []
        return GaLoreAdamW(split, lr=lr, no_deprecation_warning=True)

    description = (
        f"galore_torch.GaLoreAdamW: rank {cfg.rank}, update_proj_gap {cfg.update_proj_gap}, scale {cfg.scale},"
        f" on the {len(projected)} 2-D weights of the transformer layers; other parameters plain AdamW"
    )
    return MethodRun(hyper.module(model, galore_adamw), description)


class FusedBackward(LightningModule):
    """Manual optimization for AdaLomo, mixed into a task module: its updates run inside backward, same schedule."""

    model: nn.Module

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    @override
    def configure_optimizers(self) -> Optimizer:
        return _metered_adalomo(self.model, self.hparams["lr"])

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss: Tensor = self(batch).loss
        total = int(self.trainer.estimated_stepping_batches)
        warmup = math.ceil(self.hparams["warmup_ratio"] * total)
        lr = self.hparams["lr"] * linear_warmup_decay(self.trainer.global_step, warmup, total)
        optimizer = self.optimizers()
        optimizer.optimizer.fused_backward(loss, lr)  # type: ignore[union-attr]
        # The update has happened; step() only lets Lightning count the optimizer step and run its step hooks.
        optimizer.step()  # type: ignore[union-attr]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss.detach()


def _metered_adalomo(model: nn.Module, lr: float) -> Optimizer:
    from lomo_optim import AdaLomo

    class MeteredAdaLomo(AdaLomo):  # type: ignore[misc]  # lomo_optim ships no type information
        """Records the gradients present at once in its fused backward; ``step`` only runs Lightning's closure."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.peak_grad_bytes = self.updated_params = 0
            super().__init__(*args, **kwargs)

        def fuse_update(self) -> Callable[[Any], Any]:
            update = super().fuse_update()

            def measured(x: Any) -> Any:
                present = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
                self.peak_grad_bytes = max(self.peak_grad_bytes, sum(p.grad.nbytes for p in present))
                self.updated_params += sum(p.numel() for p in present)
                return update(x)

            return measured

        def step(self, closure: Callable[[], Any] | None = None) -> Any:
            return closure() if closure is not None else None

    return MeteredAdaLomo(model, lr=lr)


def _adalomo(model: nn.Module, cfg: DictConfig, hyper: Hyper) -> MethodRun:
    task = TASKS[hyper.task]
    module = type(f"FusedBackward{task.__name__}", (FusedBackward, task), {})(
        model, lr=hyper.lr, weight_decay=0.0, warmup_ratio=hyper.warmup_ratio
    )

    def grads(module: nn.Module) -> tuple[int, int]:
        # Its gradients live only inside backward: the most present at once, and the parameters updated.
        optimizer = module.trainer.optimizers[0]  # type: ignore[attr-defined]
        counted = (optimizer.peak_grad_bytes, optimizer.updated_params)
        optimizer.peak_grad_bytes = optimizer.updated_params = 0
        return counted

    def optimizer_state(trainer: Trainer) -> tuple[int, int]:
        optimizer = trainer.optimizers[0]
        factored = (optimizer.exp_avg_sq, optimizer.exp_avg_sq_row, optimizer.exp_avg_sq_col)
        return sum(tensor.nbytes for table in factored for tensor in table.values()), 0

    description = "lomo_optim.AdaLomo (factored second moments, update fused into backward), manual optimization"
    return MethodRun(module, description, grads=grads, optimizer_state=optimizer_state)

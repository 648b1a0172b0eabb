"""The HiFT mechanism: full-parameter fine-tuning that trains one block of layers per optimizer step.

The strategy is the mechanism: it cuts the model into blocks when fitting starts, makes exactly one block
trainable at a time, and keeps every other block's optimizer state where ``optimizer_state`` says.
:class:`~lightning_hift.callback.HiFTCallbackBase` decides when to switch, the way Lightning pairs a strategy
with a callback. The user's LightningModule, optimizer and schedulers are used as they are.

The classes here are mixins that name no Lightning class at run time, so that one implementation serves both
Lightning packages: :mod:`lightning_hift.pytorch` puts them in front of ``lightning.pytorch``'s strategies and
:mod:`lightning_hift.pytorch_lightning` in front of ``pytorch_lightning``'s.
"""

from __future__ import annotations

import atexit
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_hift import lr
from lightning_hift.block_size import BlockSizeFromBudget
from lightning_hift.blocks import Block, partition
from lightning_hift.checkpointing import CheckpointInputs
from lightning_hift.compile import CompiledByUnit, compile_by_unit
from lightning_hift.errors import HiFTConfigError
from lightning_hift.masters import MastersLifeCycle, fp32_values
from lightning_hift.memory.plan import MemoryBreakdown
from lightning_hift.nonfinite import StepGuard
from lightning_hift.optim_state import OptimizerStateMode, OptimizerStatePlacement, local
from lightning_hift.orders import OrderName
from lightning_hift.settings import ARGS, HiFTSettings, OnNonfinite, Setting, document
from lightning_hift.transfer import Transfer
from lightning_hift.units import LayersSpec, Unit, find_units

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.fabric.plugins import CheckpointIO
    from lightning.fabric.utilities.types import _DEVICE
    from lightning.pytorch.accelerators import Accelerator
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import SingleDeviceStrategy as _SingleDeviceStrategy
    from lightning.pytorch.strategies import Strategy as _Strategy

    from lightning_hift.callback import HiFTCallbackBase
else:
    _Strategy = _SingleDeviceStrategy = object


class HiFTStrategyBase(BlockSizeFromBudget, MastersLifeCycle, StepGuard, _Strategy):
    """The HiFT mechanism, shared by the one-device and the many-process strategies of both Lightning packages.

    Concrete strategies put this class before a Lightning strategy in their bases; that strategy provides the
    devices, processes and collectives, and ``strategy_kwargs`` go to it. The concrete strategies take the HiFT
    arguments one by one (their docstrings list them) and pass them here as one :class:`HiFTSettings`; each is also
    an attribute of the strategy (``strategy.order``; ``strategy.optimizer_state_mode`` for ``optimizer_state``).

    Args:
        settings: the HiFT arguments.
    """

    callback_class: ClassVar[type[HiFTCallbackBase]]
    """The HiFT callback of the strategy's Lightning package, added to the Trainer when it has none."""

    layers_per_block: Setting[int | Literal["auto"]] = Setting()
    """The block size: ``"auto"`` until a fit has set up, then the chosen whole number."""
    order: Setting[OrderName] = Setting()
    seed: Setting[int] = Setting()
    switch_every: Setting[int] = Setting()
    optimizer_state_mode: Setting[OptimizerStateMode] = Setting("optimizer_state")
    lr_update: Setting[lr.LRUpdate] = Setting()
    layers: Setting[LayersSpec] = Setting()
    frozen: Setting[tuple[str, ...]] = Setting()
    on_nonfinite: Setting[OnNonfinite] = Setting()
    lr_scale: Setting[lr.LRScale] = Setting()
    memory_budget: Setting[int | None] = Setting()
    """Device bytes the run may use per process (``memory_budget``), or None."""

    def __init__(self, settings: HiFTSettings, **strategy_kwargs: Any) -> None:
        super().__init__(**strategy_kwargs)
        self.settings = settings
        """The HiFT arguments; ``layers_per_block`` there is the chosen block size once a fit with ``"auto"`` has
        set up."""
        self.auto_block_size = settings.layers_per_block == "auto"
        self.memory_estimate: MemoryBreakdown | None = None
        """With ``"auto"`` or a ``memory_budget``, after setup: the predicted device bytes per process the block size
        was chosen (or checked) by."""
        self.skipped_nonfinite = 0
        self.measure_grads = False
        """Whether each update measures the active block's gradient for the order (set by the callback)."""
        self.last_grad_rms: float | None = None
        """The root mean square of the last update's gradient (with ``measure_grads``)."""
        self.blocks: list[Block] = []
        self.active_block: int | None = None
        self.placement: OptimizerStatePlacement | None = None
        self._init_masters()
        self._units_of_fit: list[Unit] | None = None
        self._unfrozen_at_start: list[Tensor] = []
        self._warned_no_grad: set[int] = set()
        self.callback: HiFTCallbackBase | None = None
        self._fit_callbacks: list[Any] | None = None
        self.checkpoint_inputs = CheckpointInputs()
        self.compiled_by_unit: CompiledByUnit | None = None

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        _destroy_process_groups_at_exit()
        self._attach_callback()
        self._masters_to_load = None

    def _attach_callback(self) -> None:
        assert self.lightning_module is not None
        callbacks = self.lightning_module.trainer.callbacks  # type: ignore[attr-defined]
        mine = [callback for callback in callbacks if isinstance(callback, type(self).callback_class)]
        self.callback = mine[0] if mine else type(self).callback_class()
        if not mine:
            callbacks.insert(0, self.callback)
        self._fit_callbacks = callbacks

    def running_a_tuner(self) -> bool:
        """Whether a tuner (``Tuner.lr_find``, ``BatchSizeFinder``) is running its trial steps inside this fit.

        Tuners give the Trainer a list of their own callbacks for their trials and hand the fit's list back after.
        """
        assert self.lightning_module is not None
        return self.lightning_module.trainer.callbacks is not self._fit_callbacks  # type: ignore[attr-defined]

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        module = self.lightning_module
        assert module is not None and self.callback is not None
        callbacks = module.trainer.callbacks  # type: ignore[attr-defined]
        if self.running_a_tuner() and self.callback not in callbacks:
            # Bring HiFT along into the tuner's trials, so that they train (and take memory) block by block as the
            # fit will: an lr_find over full fine-tuning would suggest a rate for full fine-tuning. Appended, as
            # lr_find reads its results from the first callback.
            callbacks.append(self.callback)
            self._masters_before_trials()
            self.callback.on_train_start(module.trainer, module)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # Strategy.setup, except that optimizer state is placed block by block instead of all on the device.
        assert self.accelerator is not None
        assert self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == "fit"
        self._units_of_fit = None
        planner = self._block_size_planner(trainer) if fitting else None
        self._prepare_model()
        full_values = fp32_values(self.model) if fitting and self._converts_to_half() else {}
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self._sync_model_states()
        if fitting:
            self._check_automatic_optimization()
            self.setup_optimizers(trainer)
            _check_optimizer(self.optimizers)
            if planner is not None:
                self._choose_block_size(planner)
            self._setup_blocks()
            self._check_rates()
            self._check_same_settings()
            self.skipped_nonfinite = 0
            self._warned_no_grad = set()
        self.setup_precision_plugin()
        if fitting:
            transfer = Transfer(self.root_device)
            self.masters = self._make_masters(transfer, full_values)
            self.placement = OptimizerStatePlacement(
                self.optimizer_state_mode,
                self.optimizers[0],
                self.blocks,
                self.root_device,
                keys=self.masters.masters if self.masters is not None else None,
                transfer=transfer,
            )

    def _units(self) -> list[Unit]:
        """The model's units, found once per setup, for the planner, the sharding, the blocks and the compilation."""
        if self._units_of_fit is None:
            assert self.lightning_module is not None
            self._units_of_fit = find_units(self.lightning_module, self.layers)
        return self._units_of_fit

    def _prepare_model(self) -> None:
        """Check or reshape the model before anything else sets up (sharding, for one); nothing to do on one device."""

    def _sync_model_states(self) -> None:
        """Make the weights the same everywhere before training; one process has nothing to do."""

    def _check_automatic_optimization(self) -> None:
        module = self.lightning_module
        assert module is not None
        if not module.automatic_optimization:
            raise HiFTConfigError(
                "HiFT needs automatic optimization: it switches blocks between optimizer steps that Lightning"
                " runs. Remove `self.automatic_optimization = False` from your LightningModule."
            )

    def _setup_blocks(self) -> None:
        module = self.lightning_module
        assert module is not None
        # Lightning allows a single optimizer under automatic optimization, which HiFT requires.
        assert isinstance(self.layers_per_block, int), "the block size is chosen before the blocks are cut"
        blocks = partition(module, self.layers_per_block, frozen=self.frozen, units=self._units())
        self.blocks = _only_optimized(blocks, self.optimizers[0])
        self.checkpoint_inputs.start(module, self.blocks)
        self.compiled_by_unit = compile_by_unit(module, units=self._units())
        self._unfrozen_at_start = [p for p in module.parameters() if p.requires_grad]
        self.active_block = None

    def _check_rates(self) -> None:
        lr.check_scaled_rates(self.optimizers[0], self.lr_factor())

    def _check_same_settings(self) -> None:
        """Every process must cut the same blocks and schedule them alike, or they would train different blocks."""
        if getattr(self, "world_size", 1) == 1:  # single-device strategies have no world size
            return
        mine = (
            [(block.names, [tuple(p.shape) for p in block.params]) for block in self.blocks],
            self.settings.shared(),
        )
        # Every process learns which ones differ, so that all stop with the same message (process 0 alone would
        # otherwise go on, and wait for the others until a collective fails).
        differs = torch.tensor([int(self.broadcast(mine) != mine)], device=self.root_device)
        ranks = [rank for rank, flag in enumerate(self.all_gather(differs).flatten().tolist()) if flag]
        if ranks:
            raise HiFTConfigError(
                f"Process(es) {ranks} cut the model into different blocks, or have different HiFT settings, than"
                f" process 0. Give every process the same model and the same {type(self).__name__} arguments"
                f" ({', '.join(name for name in ARGS if name != 'memory_budget')})."
            )

    def freeze(self) -> None:
        """Freeze every parameter; training then unfreezes one block at a time. Undone at teardown.

        Called when training starts rather than at setup, so that Lightning's model summary still shows the
        model's own trainable parameters.
        """
        self.deactivate()  # a tuner's trials may have left a block active
        for p in self._unfrozen_at_start:
            p.requires_grad_(False)

    def activate(self, index: int) -> None:
        """Make block ``index`` the only trainable one and bring its optimizer state to the device."""
        if index == self.active_block:
            return
        self.deactivate()
        assert self.placement is not None
        block = self.blocks[index]
        if self.masters is not None:
            self.masters.to_device(block)
        self.placement.to_device(block)
        for p in block.params:
            p.requires_grad_(True)
        self.active_block = index
        self.checkpoint_inputs.attach(block)

    def prefetch(self, index: int) -> None:
        """Start bringing block ``index``'s optimizer state (and masters) to the device ahead of its turn.

        On CUDA the copies overlap the current step; elsewhere this does nothing.
        """
        if index == self.active_block or self.placement is None:
            return
        block = self.blocks[index]
        if self.masters is not None:
            self.masters.prefetch(block)
        self.placement.prefetch(block)

    def deactivate(self) -> None:
        """Freeze the active block, drop its gradients and send its optimizer state to rest."""
        if self.active_block is None:
            return
        assert self.placement is not None
        block = self.blocks[self.active_block]
        for p in block.params:
            p.requires_grad_(False)
            # A LightningModule that zeroes grads instead of setting them to None would leave zero grads, and
            # the optimizer would still apply weight decay and momentum to this block while it is frozen.
            p.grad = None
        if self.masters is not None:
            self.masters.to_host(block)
        self.placement.to_rest(block)
        self.active_block = None
        self.checkpoint_inputs.detach()

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        if not closure_loss.requires_grad:
            # The active block does not reach the loss; optimizer_step warns and skips the step.
            return closure_loss
        if self.masters is not None:
            closure_loss = self.masters.scale_loss(closure_loss)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        if self.active_block is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        block = self.blocks[self.active_block]
        # The closure (forward and backward) runs here, ahead of the precision plugin, so that a step with nothing
        # to apply is skipped whole: no clipping of an empty gradient list, no GradScaler step without gradients.
        loss = closure()
        self.last_grad_rms = None
        if not self._grads_ready(block, lightning_skipped=loss is None):
            return None
        if self.measure_grads:
            self.last_grad_rms = self._grad_rms(block)
        calls = 0

        def each_call() -> Any:
            # The optimizer's first call gets the pass just made; a later call (a sharpness-aware optimizer's second
            # pass) makes a new one.
            nonlocal calls
            calls += 1
            return loss if calls == 1 else self._another_pass(closure, block, calls)

        with lr.scaled(optimizer, self.lr_factor()):
            output = super().optimizer_step(optimizer, each_call, model, **kwargs)
        if self.masters is not None:
            self.masters.masters_to_weights(block)
        return output

    def _grad_rms(self, block: Block) -> float:
        """Root mean square of the block's gradient, over the parameters that have one; loss scale divided out."""
        grads = [p.grad for p in block.params if p.grad is not None]
        # Over what this process holds (a shard under FSDP2), then added up across processes: one host sync.
        squares = self._sum_over_processes(torch.stack([local(g).detach().float().square().sum() for g in grads]).sum())
        scaler = getattr(self.precision_plugin, "scaler", None)  # 16-mixed: the gradients are still scaled
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        return float(squares.sqrt()) / scale / max(sum(g.numel() for g in grads), 1) ** 0.5  # whole sizes

    def _sum_over_processes(self, partial: Tensor) -> Tensor:
        """Add up a sum each process computed over its part of the gradients; processes that hold whole gradients
        (one process, or after hift_ddp's all-reduce) have nothing to add."""
        return partial

    def lr_factor(self) -> float:
        """What an update multiplies the optimizer's configured learning rates by (``lr_scale`` resolved)."""
        return lr.factor(self.lr_scale, len(self.blocks))

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        if self.placement is not None:
            self.placement.synchronize()
        return super().optimizer_state(optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self.placement is None:
            super().load_optimizer_state_dict(checkpoint)
            return
        (state,) = checkpoint["optimizer_states"]
        self.placement.load(state)

    @override
    def teardown(self) -> None:
        if self.placement is not None:
            self.deactivate()
            # Nothing of the fit may keep device memory once Lightning has moved the model and the optimizer state
            # to the host: the prefetched next block goes, and so do the objects that reference it. The masters'
            # values stay (host tensors), so that a checkpoint saved after the fit is exact.
            self.placement.transfer.close()
            self._keep_masters_values()
            self.placement = None
        self._masters_to_load = None
        # Hand the model back with the trainable flags it came with.
        for p in self._unfrozen_at_start:
            p.requires_grad_(True)
        self._unfrozen_at_start = []
        self.checkpoint_inputs.close()
        if self.compiled_by_unit is not None:
            self.compiled_by_unit.restore()
        super().teardown()

    @classmethod
    def _register_presets(cls, registry: Any, presets: Mapping[str, Mapping[str, Any]]) -> None:
        for name, params in presets.items():
            settings = ", ".join(f"{key}={value!r}" for key, value in params.items())
            registry.register(name, cls, description=f"{cls.__name__}({settings})", override=True, **params)


class SingleDeviceHiFT(HiFTStrategyBase, _SingleDeviceStrategy):
    __doc__: str | None = document(
        """Train every parameter, one block of ``layers_per_block`` units per optimizer step, on one device:
        ``Trainer(strategy="hift")``, or ``Trainer(strategy=HiFTStrategy(...))`` to set the arguments.""",
        {"device": "the compute device; by default the one the Trainer's accelerator gives."},
        ("accelerator", "checkpoint_io", "precision_plugin"),
    )

    strategy_name = "hift"

    def __init__(
        self,
        layers_per_block: int | Literal["auto"] = 1,
        order: OrderName = "bottom2up",
        seed: int = 0,
        switch_every: int = 1,
        optimizer_state: OptimizerStateMode = "offload",
        lr_update: lr.LRUpdate = "cycle",
        layers: LayersSpec = None,
        frozen: Sequence[str] | None = (),
        on_nonfinite: OnNonfinite = "skip",
        lr_scale: lr.LRScale = "blocks",
        memory_budget: int | str | None = None,
        *,
        device: _DEVICE | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            HiFTSettings.of(locals()),
            device=device if device is not None else "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._device_given = device is not None
        # Set by the Trainer's accelerator connector to the devices the accelerator offers.
        self.parallel_devices: list[torch.device] | None = None

    @property
    @override
    def root_device(self) -> torch.device:
        if not self._device_given and self.parallel_devices:
            return self.parallel_devices[0]
        return self._root_device

    @override
    def setup_environment(self) -> None:
        if not self._device_given and self.parallel_devices and len(self.parallel_devices) > 1:
            raise HiFTConfigError(
                f"strategy='hift' trains on one device, but the Trainer offers {len(self.parallel_devices)}. Pass"
                " `devices=1`, or use strategy='hift_ddp' to train on all of them."
            )
        super().setup_environment()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        presets = {"hift": {}, "hift_top2down": {"order": "top2down"}, "hift_random": {"order": "random"}}
        cls._register_presets(strategy_registry, presets)


def _destroy_process_groups_at_exit() -> None:
    """Destroy the process groups when the process exits, while the interpreter is still whole.

    Left to the interpreter's final clean-up, gloo's worker threads can be torn down before they are joined
    (``terminate called without an active exception``, SIGABRT), more often under load; Lightning destroys the
    process group at exit for NCCL only. A no-op where the groups are gone already.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _register_destroy_at_exit()


@functools.cache
def _register_destroy_at_exit() -> None:
    atexit.register(_destroy_process_groups)  # once per process


def _destroy_process_groups() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _check_optimizer(optimizers: Sequence[Optimizer]) -> None:
    # What HiFT needs of an optimizer: that it reads its parameters from param_groups at every step and leaves
    # parameters whose grad is None alone. LBFGS does neither (it keeps its own flat parameter list and applies
    # one direction, built from earlier steps, to all of them), so frozen blocks would move.
    for optimizer in optimizers:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise HiFTConfigError(
                "HiFT cannot train with LBFGS: it moves every parameter along one direction built from earlier"
                " steps, frozen blocks included, and keeps its own parameter list. HiFT needs an optimizer that"
                " skips parameters whose grad is None and reads its parameters from param_groups at every step"
                " (SGD, Adam, AdamW, Adagrad, RMSprop, Adafactor, ...). Use one of those, or strategy='auto'."
            )


def _only_optimized(blocks: list[Block], optimizer: Optimizer) -> list[Block]:
    """Drop parameters the optimizer does not hold: they could never be updated."""
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    kept: list[Block] = []
    missing: list[str] = []
    for block in blocks:
        names = [n for n, p in zip(block.names, block.params, strict=True) if id(p) in optimized]
        missing += [n for n, p in zip(block.names, block.params, strict=True) if id(p) not in optimized]
        if names:
            params = [p for p in block.params if id(p) in optimized]
            kept.append(Block(len(kept), block.unit_names, tuple(names), tuple(params)))
    if not kept:
        raise HiFTConfigError(
            "The optimizer holds none of the model's trainable parameters. Build it in configure_optimizers from"
            " self.parameters()."
        )
    if missing:
        rank_zero_warn(
            f"HiFT: {len(missing)} trainable parameters are not in the optimizer and will not be trained"
            f" (e.g. {missing[:3]}). Pass them to the optimizer, or freeze them with `frozen=`."
        )
    return kept

"""HiFTCallback: when to switch blocks, when the learning rate moves, and the schedule's resumable state.

A HiFT strategy adds one when the Trainer has none, so users only need it to subclass or to place it themselves.
:class:`HiFTCallbackBase` is the implementation; ``lightning_hift.HiFTCallback`` (for ``lightning.pytorch``) and
``lightning_hift.pytorch_lightning.HiFTCallback`` bind it to each Lightning package's ``Callback``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typing_extensions import override

from lightning_hift.errors import HiFTConfigError
from lightning_hift.lr import DelayedLR
from lightning_hift.memory import snapshot
from lightning_hift.orders import BlockOrder, make_order
from lightning_hift.packages import lightning_classes
from lightning_hift.strategy import HiFTStrategyBase

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback as _Callback
else:
    _Callback = object


class HiFTCallbackBase(_Callback):
    """Switches the active block every ``switch_every`` optimizer steps and applies the delayed LR update.

    Switches happen in ``on_train_batch_end`` right after an optimizer step, never between the micro-batches
    of an accumulation window, so every micro-batch of a window trains the same block.

    Args:
        log_memory: log ``hift/mem/{kind}_{place}`` bytes after every optimizer step, measured before the
            switch, while the trained block's gradients and optimizer state are still on the device.
    """

    def __init__(self, log_memory: bool = True) -> None:
        self.log_memory = log_memory
        self.order: BlockOrder | None = None
        self.delayed_lr: DelayedLR | None = None
        self.steps = 0
        self._last_global_step = 0
        self._loaded: dict[str, Any] | None = None
        self._recorded: dict[str, Any] = {}

    @staticmethod
    def _strategy(trainer: pl.Trainer) -> HiFTStrategyBase:
        strategy = trainer.strategy
        if not isinstance(strategy, HiFTStrategyBase):
            raise HiFTConfigError(
                f"HiFTCallback works with a HiFT strategy ('hift', 'hift_ddp', ...), not {type(strategy).__name__}."
                " Pass `strategy='hift'` to the Trainer, or remove the callback."
            )
        return strategy

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._strategy(trainer)
        finetuning = lightning_classes("callbacks.BaseFinetuning")
        fighting = [type(c).__name__ for c in trainer.callbacks if isinstance(c, finetuning)]  # type: ignore[attr-defined]
        if fighting:
            raise HiFTConfigError(
                f"{', '.join(fighting)} changes requires_grad between epochs, and HiFT sets it every step: the two"
                " would undo each other. Remove it; to keep parameters frozen, pass frozen=[...] to HiFTStrategy"
                " or set requires_grad=False before fit."
            )
        if stage == "fit":
            self.order, self.delayed_lr, self.steps, self._loaded = None, None, 0, None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = self._strategy(trainer)
        tuning = strategy.running_a_tuner()
        self.order = make_order(strategy.order, len(strategy.blocks), strategy.seed)
        # A tuner's trials follow the tuner's own schedule (lr_find's range test moves the rate every step).
        self.delayed_lr = DelayedLR("step" if tuning else strategy.lr_update)
        self._recorded = strategy.settings.recorded()
        self.steps = 0
        if self._loaded is not None and not tuning:
            self._resume(strategy, self._loaded)
            self._loaded = None
        if not tuning:
            strategy.ready_masters()
        self.delayed_lr.attach(trainer, self._steps_left_in_cycle(strategy))
        self._last_global_step = trainer.global_step
        strategy.measure_grads = self.order.observes
        strategy.freeze()
        strategy.activate(self.order.current())
        strategy.prefetch(self.order.block_at(self.order.position + 1))

    def saved_layers_per_block(self) -> int | None:
        """The block size of the checkpoint being resumed, when its state is loaded already (not under hift_fsdp,
        which loads checkpoints after setup) and says it."""
        return None if self._loaded is None else self._loaded.get("layers_per_block")

    def _resume(self, strategy: HiFTStrategyBase, state: dict[str, Any]) -> None:
        assert self.order is not None and self.delayed_lr is not None
        saved_size = state.get("layers_per_block")
        if saved_size is not None and saved_size != strategy.layers_per_block:
            raise HiFTConfigError(
                f"The checkpoint was written with layers_per_block={saved_size}, this run cuts blocks of"
                f" {strategy.layers_per_block} units: its schedule and state would not match. Resume with"
                f" layers_per_block={saved_size}."
            )
        self.steps = int(state["steps"])
        self.order.load_state_dict(state["order"])
        self.delayed_lr.load_state_dict(state["lr"])
        mid_slot = self.steps % strategy.switch_every != 0
        assert strategy.placement is not None
        strategy.placement.convert(state.get("optimizer_state"), self.order.current(), mid_slot)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_global_step:
            return  # inside an accumulation window: no optimizer step yet, so no switch
        self._last_global_step = trainer.global_step
        strategy = self._strategy(trainer)
        assert self.order is not None and self.delayed_lr is not None
        logs = not getattr(trainer, "barebones", False)  # Lightning refuses self.log under barebones=True
        metrics = {"hift/active_block": float(self.order.current()), "hift/cycle": float(self.order.cycle)}
        if logs and self.log_memory:
            metrics.update(snapshot(strategy).as_metrics())
        if self.order.observes and strategy.last_grad_rms is not None:
            self.order.observe(self.order.current(), strategy.last_grad_rms)
        self.steps += 1
        slot_ended = self.steps % strategy.switch_every == 0
        cycle_ended = slot_ended and self.order.at_cycle_end
        if slot_ended:
            self.order.advance()
        steps_left = self._steps_left_in_cycle(strategy)
        self.delayed_lr.after_optimizer_step(trainer, cycle_ended, self.order.cycle, steps_left)
        if slot_ended:
            strategy.activate(self.order.current())
            strategy.prefetch(self.order.block_at(self.order.position + 1))
        if logs:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def _steps_left_in_cycle(self, strategy: HiFTStrategyBase) -> int:
        """Optimizer steps of the current cycle still to come, the next one included."""
        assert self.order is not None
        every = strategy.switch_every
        done = (self.order.position % self.order.num_blocks) * every + self.steps % every
        return self.order.num_blocks * every - done

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.delayed_lr is not None:
            self.delayed_lr.detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A failed fit must still hand the schedulers back to Lightning as they were configured.
        if self.delayed_lr is not None:
            self.delayed_lr.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._loaded is not None:  # loaded, not applied yet: a tuner saves the state before the fit starts
            return dict(self._loaded)
        if self.order is None or self.delayed_lr is None:
            return {}
        # The fp32 masters of a half-precision run are the strategy's, saved by it (lightning_hift.masters).
        return {
            "steps": self.steps,
            "order": self.order.state_dict(),
            "lr": self.delayed_lr.state_dict(),
        } | self._recorded

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The blocks are only known once the strategy has set up, after Lightning restores callbacks.
        self._loaded = dict(state_dict) if state_dict else None

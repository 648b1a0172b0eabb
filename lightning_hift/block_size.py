"""The strategy's side of ``layers_per_block="auto"`` and ``memory_budget``: at setup, before the model is sharded or
converted, read the first training batch, let :class:`~lightning_hift.memory.budget.BlockSizePlanner` predict each
block size's device bytes, and keep the largest block size that fits (or check the fixed one), the same on every
process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn

from lightning_hift.checkpointing import checkpointed
from lightning_hift.errors import HiFTConfigError
from lightning_hift.memory.budget import (
    ASSUMED_STATE_BYTES,
    BlockSizePlanner,
    default_budget,
    first_batch,
    refusal,
    size,
    state_bytes_per_element,
)
from lightning_hift.memory.plan import ACTIVATIONS, MemoryBreakdown
from lightning_hift.packages import private_attribute
from lightning_hift.settings import HiFTSettings
from lightning_hift.units import Unit

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import Strategy as _Strategy

    from lightning_hift.callback import HiFTCallbackBase
    from lightning_hift.optim_state import OptimizerStateMode
    from lightning_hift.units import LayersSpec
else:
    _Strategy = object


class BlockSizeFromBudget(_Strategy):
    """Mixed into the HiFT strategies: the block size chosen, or checked, against a memory budget at setup."""

    _shards_weights: ClassVar[bool] = False
    """Whether the weights and optimizer state are split among the processes (the planner then traces before
    sharding)."""

    settings: HiFTSettings
    callback: HiFTCallbackBase | None
    layers_per_block: int | Literal["auto"]
    layers: LayersSpec
    frozen: tuple[str, ...]
    optimizer_state_mode: OptimizerStateMode
    memory_budget: int | None
    auto_block_size: bool
    memory_estimate: MemoryBreakdown | None
    """With ``"auto"`` or a ``memory_budget``, after setup: the predicted device bytes per process the block size was
    chosen (or checked) by."""

    if TYPE_CHECKING:  # provided by the strategy and by MastersLifeCycle

        def _units(self) -> list[Unit]: ...
        def _check_automatic_optimization(self) -> None: ...
        def _converts_to_half(self) -> bool: ...
        def _half_dtype(self) -> torch.dtype | None: ...

    def _block_size_planner(self, trainer: pl.Trainer) -> BlockSizePlanner | None:
        """With ``"auto"`` or a budget: read the first training batch and set up the planner (tracing now what a
        sharded model could not trace later)."""
        if not self.auto_block_size and self.memory_budget is None:
            return None
        module = self.lightning_module
        assert module is not None and self.callback is not None
        self._check_automatic_optimization()
        saved = self.callback.saved_layers_per_block()
        if self.auto_block_size:
            self.layers_per_block = "auto" if saved is None else saved  # a resumed run keeps its block size
        self._check_plannable()
        # The loaders as the fit will ask for them; the fit's own are made later, by Lightning, as always.
        loaders = None
        if trainer.limit_train_batches != 0:
            loaders = private_attribute(trainer.fit_loop, "_data_source").dataloader()
        if loaders is None:
            raise HiFTConfigError(
                f"layers_per_block='auto' and memory_budget plan from the first training batch, but this fit has"
                f" none (limit_train_batches={trainer.limit_train_batches}). Give a fixed layers_per_block and no"
                " memory_budget."
            )
        batch = self.precision_plugin.convert_input(first_batch(loaders, self.root_device))
        batch = module.on_before_batch_transfer(batch, 0)
        half = self._half_dtype()
        world_size = getattr(self, "world_size", 1)
        planner = BlockSizePlanner(
            module,
            batch,
            self.root_device,
            half,
            self.precision_plugin.train_step_context,
            self.layers,
            self.frozen,
            world_size,
            self._shards_weights,
            self._units(),
        )
        if self._shards_weights:  # the weights are about to be split: trace every block size the model state allows
            budget = self._budget()
            fixed = self.layers_per_block
            sizes = [fixed] if isinstance(fixed, int) else planner.candidates
            within = [
                m for m in sizes if planner.device_bytes(m, 0.0, self.optimizer_state_mode).total("device") <= budget
            ]
            planner.trace([block for m in within for block in planner.blocks[m]])
        return planner

    def _budget(self) -> int:
        return self.memory_budget if self.memory_budget is not None else default_budget(self.root_device)

    def _check_plannable(self) -> None:
        """Refuse a model the planner cannot trace; every model can be traced on one device or under DDP."""

    def _choose_block_size(self, planner: BlockSizePlanner) -> None:
        assert self.lightning_module is not None
        budget, mode = self._budget(), self.optimizer_state_mode
        masters = self._converts_to_half()
        trained = next((p for p in self.lightning_module.parameters() if p.requires_grad), None)
        dtype = torch.float32 if masters or trained is None else trained.dtype
        state = state_bytes_per_element(self.optimizers[0], dtype, self.root_device)
        if state is None:
            rank_zero_warn(
                f"HiFT: {type(self.optimizers[0]).__name__} could not be probed for the size of its state; the"
                f" memory plan assumes {ASSUMED_STATE_BYTES:g} bytes per trained element (AdamW in fp32)."
            )
            state = ASSUMED_STATE_BYTES
        fixed = self.layers_per_block if isinstance(self.layers_per_block, int) else None
        candidates = None if fixed is None else [fixed]
        choice = planner.choose(budget, state, mode, candidates, traced_only=self._shards_weights)
        # Every process must cut the same blocks: the smallest choice wins (0: one of them has none that fits).
        mine = choice.layers_per_block if choice is not None else 0
        chosen = min(self.all_gather(torch.tensor([mine], device=self.root_device)).flatten().tolist())
        if chosen == 0:
            m = fixed or 1
            estimate = planner.estimate(m, state, mode) if planner.traced(m) else planner.device_bytes(m, state, mode)
            message = refusal(
                m,
                fixed is None,
                estimate,
                budget,
                masters,
                self._shards_weights,
                checkpointed(self.lightning_module),
            )
            if not (self.auto_block_size and fixed is not None):
                raise HiFTConfigError(message)
            rank_zero_warn(f"HiFT: resuming with the checkpoint's block size, although {message}")
            chosen = fixed
        self.layers_per_block = int(chosen)
        estimate = choice.estimate if choice is not None and chosen == mine else planner.estimate(chosen, state, mode)
        self.memory_estimate = estimate
        figures = choice.summary() if choice is not None else ""
        rank_zero_info(
            f"HiFT: layers_per_block={chosen} ({'chosen' if fixed is None else 'checked'} for a budget of"
            f" {size(budget)} per device; predicted {size(estimate.total('device'))}, of which activations"
            f" {size(estimate.get(ACTIVATIONS, 'device'))}, for the first batch: {planner.batch_shapes()}). Per block"
            f" size: {figures}."
        )

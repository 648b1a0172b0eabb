"""``layers_per_block="auto"`` and ``memory_budget``: the choice, its figures against what a run holds, the refusal,
and resuming."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader

from lightning_hift.errors import HiFTConfigError
from lightning_hift.memory.budget import BlockSizePlanner, parse_budget, size, state_bytes_per_element
from tests.helpers.lightning import Callback, HiFTStrategy, LightningModule, seed_everything
from tests.helpers.modules import ResumableTinyModule, TinyModule, fit, quiet_trainer
from tests.helpers.tiny_models import tiny_llama_lm

UNITS = 6  # TinyModule(num_layers=4): embeddings, four layers, the output end


class SavedBytes(Callback):
    """What autograd saves in each real training step (distinct storages, the module's own excluded), the most
    per active block: the figure the planner predicts."""

    def __init__(self) -> None:
        self.by_block: dict[int, int] = {}
        self._hooks: Any = None
        self._saved: dict[StorageWeakRef, int] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._saved = {}

        def pack(tensor: Tensor) -> Tensor:
            storage = tensor.untyped_storage()
            self._saved.setdefault(StorageWeakRef(storage), storage.nbytes())
            return tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        self._hooks.__exit__(None, None, None)
        own = {StorageWeakRef(t.untyped_storage()) for t in [*pl_module.parameters(), *pl_module.buffers()]}
        nbytes = sum(n for ref, n in self._saved.items() if ref not in own)
        block = trainer.strategy.active_block
        self.by_block[block] = max(self.by_block.get(block, 0), nbytes)


def checked(m: int, module: LightningModule | None = None, **kwargs: Any) -> HiFTStrategy:
    """Fit one cycle with a fixed block size and a budget too large to matter: the strategy holds its estimate."""
    strategy = HiFTStrategy(layers_per_block=m, memory_budget="1GiB")
    fit(module or TinyModule(num_layers=4), strategy, max_steps=1, **kwargs)
    return strategy


def test_auto_chooses_the_largest_block_size_that_fits(caplog: pytest.LogCaptureFixture) -> None:
    totals = {m: checked(m).memory_estimate.total("device") for m in (1, 2, 3)}  # type: ignore[union-attr]
    assert totals[1] < totals[2] < totals[3]
    strategy = HiFTStrategy(layers_per_block="auto", memory_budget=(totals[2] + totals[3]) // 2)
    with caplog.at_level(logging.INFO):
        fit(TinyModule(num_layers=4), strategy, max_steps=3)
    (line,) = [r.getMessage() for r in caplog.records if "layers_per_block=2 (chosen" in r.getMessage()]
    assert "for the first batch: [0] 4x6, [1] 4)" in line  # TinyModule's (tokens, labels)
    figures = dict(cell.split(" ", 1) for cell in line.split("Per block size: ")[1].rstrip(".").split("; "))
    assert figures["m=2"] == size(totals[2])
    assert figures["m=3"].endswith("over the budget") and figures["m=1"].endswith("not traced")
    assert strategy.layers_per_block == 2
    assert len(strategy.blocks) == math.ceil(UNITS / 2)
    assert strategy.memory_estimate is not None
    assert strategy.memory_estimate.total("device") == totals[2]
    exact = HiFTStrategy(layers_per_block="auto", memory_budget=totals[3])  # a budget equal to the total fits
    fit(TinyModule(num_layers=4), exact, max_steps=1)
    assert exact.layers_per_block == 3


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_the_estimate_is_what_the_run_holds(precision: str) -> None:
    """Weights, gradients and optimizer state from the tensors' sizes; activations equal to what autograd saved in
    the real steps, at the worst block."""
    module = TinyModule(num_layers=4)
    saved = SavedBytes()
    strategy = HiFTStrategy(layers_per_block="auto", memory_budget="1GiB")
    fit(module, strategy, max_steps=UNITS, callbacks=[saved], precision=precision)
    estimate = strategy.memory_estimate
    assert strategy.layers_per_block == UNITS and estimate is not None
    half = precision == "bf16-true"
    trained = sum(p.numel() for p in module.parameters())
    weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    assert estimate.get("params", "device") == weights
    assert estimate.get("grads", "device") == 4 * trained
    assert estimate.get("optimizer_state", "device") == 8 * trained  # AdamW: two fp32 tensors per element
    assert estimate.get("masters", "device") == (4 * trained if half else 0)
    assert estimate.get("activations", "device") == max(saved.by_block.values())


class CheckpointedCausalLM(LightningModule):
    """A tiny Llama with reentrant gradient checkpointing: five units (embeddings, three layers, the output end)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama_lm(num_layers=3)
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(0, self.model.config.vocab_size, (16, 12), generator=torch.Generator().manual_seed(0))
        return DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


def test_activations_per_block_match_the_real_steps_of_a_checkpointed_hugging_face_model() -> None:
    """The trace runs the module's own training_step with HiFT's checkpointing hooks on the traced block."""

    for m in (1, 2):
        saved = SavedBytes()
        strategy = HiFTStrategy(layers_per_block=m, memory_budget="1GiB")
        fit(CheckpointedCausalLM(), strategy, max_steps=5, callbacks=[saved])  # five units: every block trains
        assert strategy.memory_estimate is not None
        assert len(saved.by_block) == len(strategy.blocks)  # every block has trained
        assert strategy.memory_estimate.get("activations", "device") == max(saved.by_block.values())
        largest = max(block.numel() for block in strategy.blocks)
        assert strategy.memory_estimate.get("optimizer_state", "device") == 4 * largest  # SGD's momentum


def test_blocks_of_several_sizes_traced_together_get_the_figures_they_get_alone() -> None:
    """hift_fsdp traces every block size at once, before it shards: each traced block gets HiFT's checkpointing
    hooks on its own layers, although blocks of different sizes share indices."""
    module = CheckpointedCausalLM()
    ids = torch.zeros(4, 12, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids}

    def planner() -> BlockSizePlanner:
        return BlockSizePlanner(module, batch, torch.device("cpu"), None, contextlib.nullcontext, None, ())

    alone = {}
    for m in (1, 2, 3):
        one_size = planner()
        one_size.trace(one_size.blocks[m])
        alone |= {block.names: one_size.block_activations(block) for block in one_size.blocks[m]}
    together = planner()
    blocks = [block for m in (1, 2, 3) for block in together.blocks[m]]
    together.trace(blocks)
    assert {block.names: together.block_activations(block) for block in blocks} == alone


def test_auto_refuses_before_the_first_step_when_one_unit_per_block_does_not_fit() -> None:
    module = TinyModule(num_layers=4)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    with pytest.raises(HiFTConfigError) as error:
        fit(module, HiFTStrategy(layers_per_block="auto", memory_budget=20_000), max_steps=3)
    message = str(error.value)
    assert "even one unit per block needs" in message and "over the budget of 19.53 KiB" in message
    assert "gradient checkpointing" in message and "smaller batch" in message and "bf16-true" in message
    assert "hift_fsdp" in message
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters())


def test_a_fixed_block_size_is_checked_against_the_budget() -> None:
    total = checked(3).memory_estimate.total("device")  # type: ignore[union-attr]
    with pytest.raises(HiFTConfigError, match=r"layers_per_block=3 needs .* fewer layers_per_block"):
        fit(TinyModule(num_layers=4), HiFTStrategy(layers_per_block=3, memory_budget=total - 1), max_steps=1)


def test_budget_values() -> None:
    assert parse_budget("20GiB") == 20 * 2**30
    assert parse_budget("80 GB") == 80 * 10**9
    assert parse_budget("512mib") == 512 * 2**20
    assert parse_budget(12345) == 12345
    for bad in ("20 gigs", "-1GiB", "0", 0, -5, True, 1.5, "GiB"):
        with pytest.raises(HiFTConfigError, match="memory_budget must be"):
            HiFTStrategy(layers_per_block="auto", memory_budget=bad)
    with pytest.raises(HiFTConfigError, match="whole number >= 1 or 'auto'"):
        HiFTStrategy(layers_per_block="fill")


def test_auto_on_a_cpu_needs_a_budget() -> None:
    with pytest.raises(HiFTConfigError, match="needs memory_budget= on 'cpu'"):
        fit(TinyModule(num_layers=4), HiFTStrategy(layers_per_block="auto"), max_steps=1)


def test_the_optimizer_state_size_is_probed_from_the_optimizers_class_and_settings() -> None:
    param = nn.Parameter(torch.zeros(3))
    device = torch.device("cpu")
    assert state_bytes_per_element(torch.optim.AdamW([param]), torch.float32, device) == 8
    assert state_bytes_per_element(torch.optim.AdamW([param], amsgrad=True), torch.float32, device) == 12
    assert state_bytes_per_element(torch.optim.SGD([param], lr=0.1), torch.float32, device) == 0
    assert state_bytes_per_element(torch.optim.SGD([param], lr=0.1, momentum=0.9), torch.float32, device) == 4
    assert state_bytes_per_element(torch.optim.AdamW([param]), torch.float64, device) == 16


class Shuffled(TinyModule):
    """Shuffled batches, a list it appends to and a counter in training_step: what the trace must not touch."""

    def __init__(self) -> None:
        super().__init__(num_layers=4)
        self.seen: list[Tensor] = []
        self.steps_run = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.seen.append(batch[0].clone())
        self.steps_run += 1
        self.log("loss_seen", float(self.steps_run))
        return super().training_step(batch, batch_idx)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


def test_reading_the_first_batch_and_tracing_leave_the_data_order_and_the_module_as_they_were() -> None:
    runs = {}
    for m in (2, "auto"):
        seed_everything(7)
        module = Shuffled()
        strategy = HiFTStrategy(layers_per_block=m, memory_budget=parse_budget("1GiB") if m == "auto" else None)
        fit(module, strategy, max_steps=5)
        runs[m] = module
    assert runs["auto"].steps_run == 5 and len(runs["auto"].seen) == 5
    assert all(torch.equal(a, b) for a, b in zip(runs[2].seen, runs["auto"].seen, strict=True))


def test_a_resumed_run_keeps_the_block_size_of_the_checkpoint(tmp_path: Any) -> None:
    totals = {m: checked(m).memory_estimate.total("device") for m in (2, 3)}  # type: ignore[union-attr]
    seed_everything(0)
    start = TinyModule(num_layers=4).state_dict()

    def module() -> TinyModule:
        fresh = ResumableTinyModule(num_layers=4)
        fresh.load_state_dict(start)
        return fresh

    whole = module()
    fit(whole, HiFTStrategy(layers_per_block=2), max_steps=8)

    first = HiFTStrategy(layers_per_block="auto", memory_budget=totals[2])
    trainer = fit(module(), first, max_steps=4)
    assert first.layers_per_block == 2
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    resumed_module = module()
    resumed = HiFTStrategy(layers_per_block="auto", memory_budget=totals[3])  # would choose 3 afresh
    trainer = quiet_trainer(strategy=resumed, max_steps=8)
    trainer.fit(resumed_module, ckpt_path=tmp_path / "four.ckpt")
    assert resumed.layers_per_block == 2
    for a, b in zip(whole.parameters(), resumed_module.parameters(), strict=True):
        assert torch.equal(a, b)

    with pytest.raises(HiFTConfigError, match=r"written with layers_per_block=2.*Resume with layers_per_block=2"):
        quiet_trainer(strategy=HiFTStrategy(layers_per_block=3), max_steps=8).fit(
            module(), ckpt_path=tmp_path / "four.ckpt"
        )


class WithMetrics(TinyModule):
    """A torchmetrics metric updated and logged in training_step, another only updated: their updates read values
    (no fake tensor can), and the trace must leave their state alone."""

    def __init__(self) -> None:
        super().__init__(num_layers=4)
        torchmetrics = pytest.importorskip("torchmetrics")
        self.logged = torchmetrics.classification.MulticlassAccuracy(num_classes=4)
        self.kept = torchmetrics.classification.MulticlassAccuracy(num_classes=4)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, labels = batch
        logits = self.net(tokens)
        self.logged(logits, labels)
        self.log("acc", self.logged, on_step=False, on_epoch=True)
        self.kept.update(logits, labels)
        return nn.functional.cross_entropy(logits, labels)


def test_a_training_step_with_metrics_is_traced_and_the_metrics_see_only_the_real_steps() -> None:
    results = {}
    for m in (UNITS, "auto"):
        seed_everything(3)
        module = WithMetrics()
        fit(module, HiFTStrategy(layers_per_block=m, memory_budget="1GiB" if m == "auto" else None), max_steps=3)
        assert module.kept.update_count == 3
        results[m] = module.kept.compute()
    assert torch.equal(results[UNITS], results["auto"])

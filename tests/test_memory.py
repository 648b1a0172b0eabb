"""The memory planner against the HiFT paper's table, and the live snapshot against the planner."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_hift.errors import HiFTConfigError
from lightning_hift.memory import GIB, estimate_memory, main, snapshot
from tests.helpers.lightning import Callback, HiFTCallback, HiFTStrategy, LightningModule, Trainer
from tests.helpers.modules import TinyModule, fit


def gib(n: int) -> float:
    return n / GIB


# LLaMA-2-7B, one layer per block: the model-state ("PGS") column of the paper's memory table, in GiB.
PAPER = [
    ("adamw", "32-true", 100.41, 27.36),
    ("adamw", "mixed", 112.96, 39.92),
    ("adamw", "bf16-true", None, 15.57),
    ("sgd_momentum", "32-true", 75.31, 26.61),
    ("adagrad", "32-true", 75.31, 26.61),
    ("sgd", "32-true", 50.21, 25.86),
]


@pytest.fixture(scope="module")
def llama7b_estimates() -> dict[tuple[str, str], Any]:
    return {(opt, prec): estimate_memory("llama2-7b", prec, opt) for opt, prec, _, _ in PAPER}


@pytest.mark.parametrize(("optimizer", "precision", "fpft", "hift"), PAPER)
def test_planner_reproduces_the_paper(
    llama7b_estimates: dict[tuple[str, str], Any], optimizer: str, precision: str, fpft: float | None, hift: float
) -> None:
    estimate = llama7b_estimates[(optimizer, precision)]
    assert estimate.num_params == pytest.approx(6_738.42e6, abs=0.01e6)
    assert estimate.largest_block == pytest.approx(202.38e6, abs=0.01e6)
    assert gib(estimate.hift.total("device")) == pytest.approx(hift, abs=0.05)
    if fpft is not None:
        assert gib(estimate.fpft.total("device")) == pytest.approx(fpft, abs=0.05)


def test_planner_host_side_is_the_offloaded_state_and_masters() -> None:
    estimate = estimate_memory("llama2-7b", "bf16-true", "adamw")
    rest = estimate.trainable_params - estimate.largest_block
    assert estimate.hift.get("optimizer_state", "host") == 8 * rest
    assert estimate.hift.get("masters", "host") == 4 * rest
    reset = estimate_memory("llama2-7b", "32-true", "adamw", optimizer_state="reset")
    assert reset.hift.total("host") == 0


def test_planner_bad_arguments() -> None:
    with pytest.raises(HiFTConfigError, match="precision"):
        estimate_memory("llama2-7b", precision="fp8")
    with pytest.raises(HiFTConfigError, match="optimizer"):
        estimate_memory("llama2-7b", optimizer="lion")


def test_command_line_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["llama2-7b", "--optimizer", "sgd"])
    out = capsys.readouterr().out
    assert "50.21" in out and "25.86" in out


class SnapshotBeforeSwitch(Callback):
    """Placed before HiFTCallback, so it sees the trained block's grads and state before the switch."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, Any]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        strategy = trainer.strategy
        assert isinstance(strategy, HiFTStrategy) and strategy.active_block is not None
        self.rows.append((strategy.active_block, snapshot(strategy)))


def test_snapshot_after_every_step_is_the_active_block_and_agrees_with_the_planner() -> None:
    probe = SnapshotBeforeSwitch()
    module = TinyModule(optimizer="adamw")
    trainer = fit(module, HiFTStrategy(), max_steps=8, callbacks=[probe, HiFTCallback()])
    strategy = trainer.strategy
    assert isinstance(strategy, HiFTStrategy)
    sizes = [block.numel() for block in strategy.blocks]
    total = sum(sizes)
    estimate = estimate_memory(module, "32-true", "adamw")
    for step, (active, taken) in enumerate(probe.rows):
        assert taken.get("grads", "device") == 4 * sizes[active]
        assert taken.get("optimizer_state", "device") == 8 * sizes[active]
        trained_before = set(range(min(step, len(sizes)))) - {active}
        assert taken.get("optimizer_state", "host") == 8 * sum(sizes[b] for b in trained_before)
        assert taken.get("params", "device") == 4 * total
        if sizes[active] == max(sizes):
            for kind in ("grads", "optimizer_state"):
                assert taken.get(kind, "device") == estimate.hift.get(kind, "device")
    assert estimate.hift.get("optimizer_state", "host") == 8 * (total - max(sizes))
    assert trainer.callback_metrics["hift/mem/grads_device"].item() > 0

"""The memory planner against the HiFT paper's table, and the live snapshot against the planner."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from lightning_hift.errors import HiFTConfigError
from lightning_hift.memory import GIB, estimate_memory, estimate_per_rank, snapshot
from lightning_hift.memory.__main__ import main
from tests.helpers.lightning import Callback, HiFTCallback, HiFTStrategy, LightningModule, Trainer
from tests.helpers.modules import StepRecorder, TinyModule, fit


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
    # The paper counts the active block only: no prefetched next block.
    return {(opt, prec): estimate_memory("llama2-7b", prec, opt, prefetch=False) for opt, prec, _, _ in PAPER}


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


@pytest.mark.parametrize(
    ("precision", "optimizer_state"),
    [("32-true", "offload"), ("bf16-true", "offload"), ("bf16-true", "reset"), ("32-true", "keep")],
)
def test_planner_counts_the_next_block_brought_to_the_device_ahead_of_its_turn(
    precision: str, optimizer_state: str
) -> None:
    """On CUDA the next block's offloaded state and its fp32 masters are copied in while the current block trains."""
    ahead = estimate_memory("llama2-7b", precision, "adamw", optimizer_state=optimizer_state)
    alone = estimate_memory("llama2-7b", precision, "adamw", optimizer_state=optimizer_state, prefetch=False)
    layer = 202_383_360  # the next block is at most the second largest: another decoder layer
    state = 8 * layer if optimizer_state == "offload" else 0
    masters = 4 * layer if precision == "bf16-true" else 0
    assert ahead.hift.get("optimizer_state", "device") - alone.hift.get("optimizer_state", "device") == state
    assert ahead.hift.get("masters", "device") - alone.hift.get("masters", "device") == masters
    assert ahead.hift.total("host") == alone.hift.total("host")
    assert ahead.fpft.bytes == alone.fpft.bytes


class SnapshotWithCopiesInFlight(Callback):
    """Snapshots once without and once with copies in flight, as ``Transfer.prefetch`` leaves them on CUDA until
    the block's turn: an event and the device copies, under a ("state" | "master", block) tag."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Any, Any]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        strategy = trainer.strategy
        assert isinstance(strategy, HiFTStrategy) and strategy.placement is not None
        incoming = strategy.placement.transfer._incoming
        before = snapshot(strategy)
        incoming[("state", 1)] = (None, {(0, "exp_avg"): torch.zeros(10)})  # type: ignore[assignment]
        incoming[("master", 1)] = (None, {0: torch.zeros(6)})  # type: ignore[assignment]
        self.pairs.append((before, snapshot(strategy)))
        incoming.clear()  # nothing in flight on this CPU: the next switch must find nothing to take


def test_snapshot_counts_the_copies_on_their_way_to_the_device() -> None:
    probe = SnapshotWithCopiesInFlight()
    fit(TinyModule(optimizer="adamw"), HiFTStrategy(), max_steps=2, callbacks=[probe])
    for before, after in probe.pairs:
        assert after.get("optimizer_state", "device") - before.get("optimizer_state", "device") == 40
        assert after.get("masters", "device") - before.get("masters", "device") == 24
        assert after.total("host") == before.total("host")


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ({"precision": "fp8"}, "Unknown precision='fp8'"),
        ({"optimizer": "lion"}, "Unknown optimizer='lion'"),
        ({"optimizer_state": "bogus"}, "Unknown optimizer_state='bogus'"),
        ({"layers_per_block": 0}, "layers_per_block must be an int >= 1"),
        ({"prefetch": "no"}, "prefetch must be True or False"),
    ],
)
def test_planner_bad_arguments_are_named(argument: dict[str, Any], message: str) -> None:
    with pytest.raises(HiFTConfigError, match=message):
        estimate_memory("llama2-7b", **argument)
    with pytest.raises(HiFTConfigError, match=message):
        estimate_per_rank("llama2-7b", 2, **argument)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["llama2-7b", "--layers-per-block", "0"], "--layers-per-block: must be a whole number >= 1, got '0'"),
        (["llama2-7b", "--world-size", "two"], "--world-size: must be a whole number >= 1, got 'two'"),
        (["llama2-7b", "--optimizer-state", "bogus"], "--optimizer-state: invalid choice: 'bogus'"),
        (["llama2-7b", "--precision", "fp8"], "--precision: invalid choice: 'fp8'"),
        (["/no/such/model/folder"], "cannot plan '/no/such/model/folder'"),
        (["llama2-7b", "--batch-size", "2"], "give --batch-size and --seq-len together"),
        (["llama2-7b", "--batch-size", "1", "--seq-len", "8", "--gradient-checkpointing", "yes"], "invalid choice"),
    ],
)
def test_command_line_refuses_bad_values_with_a_usage_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m lightning_hift.memory") and message in err
    assert "Traceback" not in err


@pytest.mark.integration
def test_the_command_line_module_runs_without_warnings() -> None:
    command = [sys.executable, "-W", "error::RuntimeWarning", "-m", "lightning_hift.memory", "llama2-7b"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RuntimeWarning" not in result.stderr and "HiFT device" in result.stdout


def test_fp16_plans_no_hift_fsdp_which_does_not_train_in_fp16() -> None:
    for precision in ("16-true", "16-mixed", "mixed"):
        rank = estimate_per_rank("llama2-7b", 8, precision)
        assert set(rank.ranks) == {"fsdp", "hift_ddp"}
        assert "hift_fsdp trains at 32-true, bf16-true, bf16-mixed, not" in rank.table()
    assert "hift_fsdp" in estimate_per_rank("llama2-7b", 8, "bf16-mixed").ranks


def test_command_line_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["llama2-7b", "--optimizer", "sgd", "--no-prefetch"])
    out = capsys.readouterr().out
    assert "50.21" in out and "25.86" in out


def test_snapshot_after_every_step_is_the_active_block_and_agrees_with_the_planner() -> None:
    probe = StepRecorder(memory=True)  # before HiFTCallback: the trained block's grads and state before the switch
    module = TinyModule(optimizer="adamw")
    trainer = fit(module, HiFTStrategy(), max_steps=8, callbacks=[probe, HiFTCallback()])
    strategy = trainer.strategy
    assert isinstance(strategy, HiFTStrategy)
    sizes = [block.numel() for block in strategy.blocks]
    total = sum(sizes)
    estimate = estimate_memory(module, "32-true", "adamw", prefetch=False)  # nothing is prefetched on a CPU
    assert len(probe.memory) == 8
    for step, (active, taken) in enumerate(zip(probe.active, probe.memory, strict=True)):
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


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_per_rank_estimate_splits_what_fsdp_shards_and_adds_one_gathered_unit(precision: str) -> None:
    world = 8
    one = estimate_memory("llama2-70b", precision, "adamw")
    rank = estimate_per_rank("llama2-70b", world, precision, "adamw")
    hidden, kv, mlp = 8192, 8 * 128, 28672  # a layer: q and o, k and v (8 of 64 heads), the MLP, two norms
    assert rank.largest_unit == 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden
    gathered = (2 if precision == "bf16-true" else 4) * 2 * rank.largest_unit  # its weights and its gradient
    for name, whole in (("fsdp", one.fpft), ("hift_fsdp", one.hift)):
        for (kind, place), nbytes in whole.bytes.items():
            assert rank.ranks[name].get(kind, place) == -(-nbytes // world)
        assert rank.ranks[name].get("gathered", "device") == gathered
    assert rank.ranks["hift_ddp"].bytes == one.hift.bytes  # replicated: nothing is split
    if precision == "32-true":  # FSDP full fine-tuning with AdamW: about 16 bytes per parameter per process
        assert rank.ranks["fsdp"].total("device") - gathered == pytest.approx(16 * one.num_params / world, rel=1e-6)
    else:  # the 70B target: full-parameter fine-tuning on eight 24 GB cards
        assert rank.ranks["hift_fsdp"].total("device") <= 24e9


def test_one_process_gathers_nothing_and_bad_world_sizes_are_refused() -> None:
    rank = estimate_per_rank("llama2-7b", 1)
    assert rank.ranks["hift_fsdp"].bytes == estimate_memory("llama2-7b").hift.bytes
    for bad in (0, -2, 1.5, True):
        with pytest.raises(HiFTConfigError, match="world_size must be a positive whole number"):
            estimate_per_rank("llama2-7b", bad)  # type: ignore[arg-type]


def test_command_line_prints_the_per_rank_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["llama2-13b", "--world-size", "8", "--precision", "bf16-true"])
    out = capsys.readouterr().out
    assert "per process of 8" in out and "hift_fsdp device" in out and "gathered" in out


def test_the_figures_come_from_the_tensors_not_from_the_strategys_word() -> None:
    """A run on an accelerator (the meta device stands in for it: the one device this machine has besides the host)
    whose strategy believes both blocks' optimizer state and masters rest in host memory, while block 0's are still
    on the device: they must count as device bytes."""
    from types import SimpleNamespace

    from lightning_hift.blocks import Block

    device = torch.device("meta")
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(device)
    first, second = list(module[0].parameters()), list(module[1].parameters())
    blocks = [
        Block(0, ("0",), ("0.weight", "0.bias"), tuple(first)),
        Block(1, ("1",), ("1.weight", "1.bias"), tuple(second)),
    ]
    state = {p: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(p.shape, device=device)} for p in first}
    state |= {p: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(p.shape)} for p in second}
    masters = {id(p): torch.zeros(p.shape, device=device) for p in first}
    masters |= {id(p): torch.zeros(p.shape) for p in second}
    strategy = SimpleNamespace(
        lightning_module=module,
        root_device=device,
        blocks=blocks,
        placement=SimpleNamespace(
            where=lambda block: "host",  # wrong for block 0
            optimizer=SimpleNamespace(state=state),
            keys=lambda block: block.params,
            transfer=SimpleNamespace(incoming_bytes=lambda kind: 0, pinned_bytes=0),
        ),
        masters=SimpleNamespace(
            where=lambda block: "host", masters=lambda block: [masters[id(p)] for p in block.params]
        ),
    )
    taken = snapshot(strategy)  # type: ignore[arg-type]
    first_bytes, second_bytes = 4 * (16 + 4), 4 * (8 + 2)
    assert taken.get("optimizer_state", "device") == taken.get("masters", "device") == first_bytes
    assert taken.get("optimizer_state", "host") == taken.get("masters", "host") == second_bytes
    assert taken.get("params", "device") == first_bytes + second_bytes and taken.total("host") == 2 * second_bytes


def test_activations_join_both_breakdowns_given_a_batch_shape() -> None:
    from lightning_hift.blocks import partition
    from lightning_hift.memory.activations import activation_bytes, hf_batch
    from tests.helpers.tiny_models import TINY_MODELS

    model = TINY_MODELS["llama-lm"]()
    plain = estimate_memory(model, "bf16-true")
    planned = estimate_memory(model, "bf16-true", batch_size=2, seq_len=16)
    assert "activations" not in plain.table() and "activations" in planned.table()
    blocks = partition(model, 1)
    sets = [[p for b in blocks for p in b.params], *[b.params for b in blocks]]
    figures = activation_bytes(model, hf_batch(model, 2, 16), sets, "bf16-true")
    assert planned.fpft.get("activations", "device") == figures[0] > 0
    assert planned.hift.get("activations", "device") == max(figures[1:]) > 0
    model_state = planned.hift.total("device") - planned.hift.get("activations", "device")
    assert model_state == plain.hift.total("device")
    with pytest.raises(HiFTConfigError, match="batch_size and seq_len"):
        estimate_memory(model, batch_size=2)
    checkpointed = estimate_memory(model, "bf16-true", batch_size=2, seq_len=16, gradient_checkpointing=True)
    assert checkpointed.fpft.get("activations", "device") < figures[0]


def test_activations_are_each_processs_whole_not_split() -> None:
    from tests.helpers.tiny_models import TINY_MODELS

    model = TINY_MODELS["llama-lm"]()
    one = estimate_memory(model, "bf16-true", batch_size=2, seq_len=16)
    rank = estimate_per_rank(model, 4, "bf16-true", batch_size=2, seq_len=16)
    assert rank.ranks["fsdp"].get("activations", "device") == one.fpft.get("activations", "device")
    for name in ("hift_ddp", "hift_fsdp"):
        assert rank.ranks[name].get("activations", "device") == one.hift.get("activations", "device")
    assert "activations" in rank.table()

"""HiFTFSDPStrategy: two CPU processes (gloo) with the model sharded by FSDP2 train like one process over the same
global batch, send only the active block's gradients, and hold half of the optimizer state each."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_hift import HiFTConfigError
from lightning_hift.memory import estimate_per_rank
from tests.helpers.distributed import (
    GLOBAL_BATCH,
    SAMPLES,
    WORLD,
    MismatchedSeedFSDP,
    ShardedTinyModule,
    assert_same,
    fit_one_process,
    fit_processes,
    saved_masters,
)
from tests.helpers.lightning import HiFTFSDPStrategy, Trainer
from tests.helpers.modules import quiet_trainer

pytestmark = pytest.mark.integration
VERDICT_BYTES = 4
fit_sharded = partial(fit_processes, strategy_class=HiFTFSDPStrategy)


def sent(batch: dict[str, Any]) -> tuple[int, int]:
    """The bytes a micro-batch reduce-scattered and all-reduced."""
    return batch["sent"]["reduce_scatter"], batch["sent"]["all_reduce"]


@pytest.mark.parametrize(
    "hift", [{"lr_scale": 1.0}, {"order": "random", "optimizer_state": "reset", "layers_per_block": 2}], ids=str
)
def test_two_sharded_processes_train_like_one_process_over_the_global_batch(tmp_path: Path, hift: dict) -> None:
    steps = 12  # two cycles of the six units
    reports = fit_sharded(tmp_path, steps, **hift)  # rank 1 starts from skewed weights
    assert [r["world_size"] for r in reports] == [WORLD, WORLD]
    gathered = reports[0]["params"]
    assert_same(gathered, fit_one_process(steps, **hift), exact=False)

    for report in reports:
        batches = report["batches"]
        assert len(batches) == steps
        for batch in batches:
            # FSDP2 reduce-scatters exactly the active block's gradients (the others have none); besides, one int:
            # the processes' common verdict on whether the gradients are finite.
            assert sent(batch) == (batch["block_grad_bytes"], VERDICT_BYTES)
    # Each process holds half of the weights and of the active block's gradients and state, as the planner says.
    planned = estimate_per_rank(ShardedTinyModule(), WORLD, prefetch=False).ranks["hift_fsdp"]  # no prefetch on CPU
    largest = max(batch["block_grad_bytes"] for batch in reports[0]["batches"])
    for report in reports:
        for batch in report["batches"]:
            held, grads = batch["memory"], batch["block_grad_bytes"]
            assert held["params_device"] == planned.get("params", "device")
            assert held["grads_device"] == grads // WORLD
            assert held["optimizer_state_device"] == 2 * grads // WORLD  # AdamW: two tensors per parameter
            if grads == largest and hift.get("optimizer_state") != "reset":
                assert held["grads_device"] == planned.get("grads", "device")
                assert held["optimizer_state_device"] == planned.get("optimizer_state", "device")
    # Every tensor of optimizer state is split between the processes: together they hold it once.
    for first, second in zip(reports[0]["batches"], reports[1]["batches"], strict=True):
        assert first["state_full_bytes"] == second["state_full_bytes"]
        assert first["state_local_bytes"] + second["state_local_bytes"] == first["state_full_bytes"]
    assert max(batch["state_full_bytes"] for batch in reports[0]["batches"]) > 0


class SelfSharded(ShardedTinyModule):
    """Applies FSDP2 itself, as Lightning's ModelParallelStrategy asks modules to."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in self.net.layers:
            fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


def test_a_module_sharded_by_its_own_configure_model_is_used_as_it_is(tmp_path: Path) -> None:
    steps = 6
    reports = fit_sharded(tmp_path, steps, module_class=SelfSharded, lr_scale=1.0)
    assert_same(reports[0]["params"], fit_one_process(steps, lr_scale=1.0), exact=False)
    assert all(batch["sent"]["reduce_scatter"] == batch["block_grad_bytes"] for batch in reports[0]["batches"])


def test_a_consolidated_checkpoint_continues_on_one_process(tmp_path: Path) -> None:
    # Three blocks of two units, four steps each, six steps an epoch: step 10 is mid-slot, mid-cycle, mid-epoch.
    hift = {"layers_per_block": 2, "switch_every": 4}
    fit_sharded(tmp_path / "first", 16, checkpoint_dir=tmp_path / "ckpt", stop_at=10, **hift)
    (ckpt,) = (tmp_path / "ckpt").iterdir()  # one file, written by rank 0
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["global_step"] == 10
    assert all(type(value) is torch.Tensor for value in checkpoint["state_dict"].values())  # plain, whole tensors
    uninterrupted = fit_one_process(16, **hift)
    assert_same(fit_one_process(16, ckpt_path=ckpt, **hift), uninterrupted, exact=False)
    # Plain Lightning (full fine-tuning, one process) takes it too: weights by name, optimizer state by index.
    module = ShardedTinyModule(lr=1e-2, schedule=(2, 12), samples=SAMPLES, batch_size=GLOBAL_BATCH)
    plain = quiet_trainer(max_steps=12, use_distributed_sampler=False, enable_checkpointing=False)
    plain.fit(module, ckpt_path=ckpt)
    optimizer = plain.optimizers[0]
    first = next(module.parameters())  # the embeddings: block 0 had 4 steps before the checkpoint
    assert plain.global_step == 12 and int(optimizer.state[first]["step"]) == 4 + 2


def test_fp16_is_refused_when_the_trainer_is_built() -> None:
    # "16-mixed" Lightning refuses itself for its ModelParallelStrategy.
    with pytest.raises(HiFTConfigError, match="use bf16, or strategy='hift_ddp' for fp16"):
        Trainer(strategy=HiFTFSDPStrategy(start_method="spawn"), devices=2, precision="16-true")


def sharded_and_replicated(tmp_path: Path, steps: int, precision: str) -> tuple[list[dict[str, Any]], Any, Any]:
    """The same run under hift_fsdp and under hift_ddp: the sharded run's reports, its gathered weights, and the
    replicated run's weights."""
    reports = fit_sharded(tmp_path / "fsdp", steps, precision=precision, lr_scale=1.0)
    replicated = fit_processes(tmp_path / "ddp", steps, precision=precision, lr_scale=1.0)
    return reports, reports[0]["params"], replicated[0]["params"]


def test_bf16_weights_step_fp32_masters_and_every_block_is_reduced_in_fp32(tmp_path: Path) -> None:
    reports, gathered, replicated = sharded_and_replicated(tmp_path, 12, "bf16-true")
    assert all(p.dtype == torch.bfloat16 for p in gathered.values())
    # Each process computes in bf16 on its half of the batch, as under hift_ddp, whose bf16 gradients are halved and
    # summed: with two processes that rounds like FSDP2's fp32 sum, so the two strategies agree to the bit.
    assert_same(gathered, replicated, exact=True)
    for report in reports:
        for batch in report["batches"]:
            # fp32 sums of bf16 gradients: twice the bytes of the bf16 weights, for the first block and the others,
            # which FSDP2 would have left in bf16 after being frozen at its first forward.
            assert batch["sent"]["reduce_scatter"] == 2 * batch["block_grad_bytes"], batch["block"]
            assert batch["memory"]["masters_device"] == 2 * batch["block_grad_bytes"] // WORLD  # fp32, a half each
    # A consolidated checkpoint is gathered to process 0 alone: AdamW's two fp32 state tensors and the fp32 master
    # of every weight, whole (plus the step counters); process 1 keeps nothing of it.
    whole = sum(p.numel() for p in gathered.values())
    assert reports[0]["checkpoint_bytes"] >= 3 * 4 * whole
    assert reports[1]["checkpoint_bytes"] == 0


def test_an_optimizer_that_calls_its_closure_twice_steps_each_pass_on_the_fp32_masters(tmp_path: Path) -> None:
    # SAM under bf16-true: each pass's sharded gradients reach the sharded masters, and the second pass runs on the
    # ascended masters. bf16 arithmetic moves the masters 1e-5 from a fp32 run's weights; a pass whose gradients do
    # not reach them, 2e-3.
    hift = {"optimizer": "sam", "lr_scale": 1.0}
    reports = fit_sharded(tmp_path, 8, checkpoint_dir=tmp_path / "ckpt", stop_at=8, precision="bf16-true", **hift)
    assert_same(saved_masters(tmp_path / "ckpt"), fit_one_process(8, **hift), exact=False)
    for batch in reports[0]["batches"]:
        assert batch["sent"]["reduce_scatter"] == 2 * 2 * batch["block_grad_bytes"]  # two passes of fp32 sums


def test_bf16_mixed_trains_fp32_weights_under_autocast(tmp_path: Path) -> None:
    reports, gathered, replicated = sharded_and_replicated(tmp_path, 6, "bf16-mixed")
    assert all(p.dtype == torch.float32 for p in gathered.values())
    assert_same(gathered, replicated, exact=False)
    assert all(b["sent"]["reduce_scatter"] == b["block_grad_bytes"] for b in reports[0]["batches"])


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_a_checkpoint_resumes_on_two_sharded_processes_bit_for_bit(tmp_path: Path, precision: str) -> None:
    # Stopped at step 6, mid-slot of block 1: block 2 has never trained, so it has no optimizer state to save.
    hift = {"layers_per_block": 2, "switch_every": 4, "precision": precision}
    fit_sharded(tmp_path / "first", 16, checkpoint_dir=tmp_path / "ckpt", stop_at=6, **hift)
    (ckpt,) = (tmp_path / "ckpt").iterdir()
    assert ckpt.is_file()  # one consolidated file, written by rank 0
    if precision == "bf16-true":
        # The fp32 masters and their optimizer state are sharded like the weights; the checkpoint holds them whole.
        saved = torch.load(ckpt, weights_only=True)["hift_masters"]["masters"]
        assert all(type(m) is torch.Tensor and m.dtype == torch.float32 for m in saved)
    resumed = fit_sharded(tmp_path / "resumed", 16, ckpt_path=ckpt, **hift)
    uninterrupted = fit_sharded(tmp_path / "full", 16, **hift)
    assert_same(resumed[0]["params"], uninterrupted[0]["params"], exact=True)
    # One process continues it too (masters and optimizer state by index, whole): steps 6 and 7 finish block 1's
    # slot and leave the other blocks' weights as the checkpoint has them.
    continued = fit_one_process(8, ckpt_path=ckpt, **hift)
    weights = torch.load(ckpt, weights_only=True)["state_dict"]
    block_1 = ("net.layers.1.", "net.layers.2.")
    assert all(torch.equal(p, weights[n]) != n.startswith(block_1) for n, p in continued.items())
    # The loaded optimizer state rests where the uninterrupted run kept it: the waiting block's in host memory.
    assert (
        resumed[0]["batches"][0]["places"] == uninterrupted[0]["batches"][6]["places"] == ["host", "device", "absent"]
    )


def test_clipping_and_the_grad_norm_order_see_the_whole_gradient_not_a_shard(tmp_path: Path) -> None:
    # Both need the norm of the active block's whole gradient, of which each process holds half. The clip is below
    # the gradients' norm, so steps are clipped, and SGD's update is in proportion to the clipped gradient.
    hift = {"order": "grad_norm", "optimizer": "sgd", "clip": 0.02}
    steps = 12  # a measuring cycle, then a drawn one
    reports = fit_sharded(tmp_path, steps, **hift)
    assert_same(reports[0]["params"], fit_one_process(steps, **hift), exact=False)
    # The order weighs blocks by what every process measured alike: the RMS over both shards.
    measured = [[batch["grad_rms"] for batch in report["batches"]] for report in reports]
    assert measured[0] == measured[1] and all(rms > 0 for rms in measured[0])


class PoisonOneShard(ShardedTinyModule):
    """At optimizer step 3, process 0 finds an inf in its shard of the active block's gradient; process 1's shard is
    finite. On one process (no shards) the same element of the whole gradient is poisoned."""

    def on_after_backward(self) -> None:
        if self.trainer.global_step != 3 or self.trainer.global_rank != 0:
            return
        strategy: Any = self.trainer.strategy
        grad = strategy.blocks[strategy.active_block].params[0].grad
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        local.view(-1)[0] = float("inf")


def test_a_nonfinite_gradient_in_one_shard_skips_the_step_on_every_process(tmp_path: Path) -> None:
    steps = 6
    reports = fit_sharded(tmp_path, steps, module_class=PoisonOneShard, lr_scale=1.0)
    assert [report["skipped"] for report in reports] == [1, 1]
    assert_same(reports[0]["params"], fit_one_process(steps, module_class=PoisonOneShard, lr_scale=1.0), exact=False)


def test_processes_that_disagree_on_the_settings_stop_before_training(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"different HiFT settings(.|\n)*MismatchedSeedFSDP arguments"):
        fit_sharded(tmp_path, 2, strategy_class=MismatchedSeedFSDP)


def test_a_one_process_checkpoint_continues_on_two_sharded_processes(tmp_path: Path) -> None:
    hift = {"layers_per_block": 2, "switch_every": 4}
    fit_one_process(16, checkpoint_dir=tmp_path / "ckpt", stop_at=10, **hift)
    (ckpt,) = (tmp_path / "ckpt").iterdir()
    continued = fit_sharded(tmp_path / "sharded", 16, ckpt_path=ckpt, **hift)
    assert_same(continued[0]["params"], fit_one_process(16, **hift), exact=False)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_a_sharded_checkpoint_resumes_on_two_processes_bit_for_bit(tmp_path: Path, precision: str) -> None:
    # Stopped at step 6, mid-slot of block 1: block 2 has no optimizer state (nor, under bf16, stepped masters) yet.
    hift = {"layers_per_block": 2, "switch_every": 4, "precision": precision, "save_distributed_checkpoint": True}
    fit_sharded(tmp_path / "first", 16, checkpoint_dir=tmp_path / "ckpt", stop_at=6, **hift)
    (ckpt,) = (tmp_path / "ckpt").iterdir()
    # A folder: each process's shards, and process 0's file of everything else.
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file() and len(list(ckpt.glob("*.distcp"))) == WORLD
    resumed = fit_sharded(tmp_path / "resumed", 16, ckpt_path=ckpt, **hift)
    uninterrupted = fit_sharded(tmp_path / "full", 16, **hift)
    assert_same(resumed[0]["params"], uninterrupted[0]["params"], exact=True)
    assert (
        resumed[0]["batches"][0]["places"] == uninterrupted[0]["batches"][6]["places"] == ["host", "device", "absent"]
    )


def test_a_bf16_checkpoint_continues_at_full_precision_from_its_masters_sharded_or_not(tmp_path: Path) -> None:
    # A half-precision run's fp32 masters become the fp32 weights of a 32-true run, from a consolidated file or a
    # sharded folder alike (the folder holds the masters as shards of their own).
    bf16 = {"layers_per_block": 2, "switch_every": 4, "precision": "bf16-true"}
    continued = {}
    for sharded in (False, True):
        out = tmp_path / f"sharded={sharded}"
        fit_sharded(
            out / "first", 16, checkpoint_dir=out / "ckpt", stop_at=6, save_distributed_checkpoint=sharded, **bf16
        )
        (ckpt,) = (out / "ckpt").iterdir()
        assert ckpt.is_dir() == sharded
        hift = {**bf16, "precision": "32-true"}
        continued[sharded] = fit_sharded(out / "resumed", 16, ckpt_path=ckpt, **hift)[0]["params"]
    assert all(value.dtype == torch.float32 for value in continued[True].values())
    assert_same(continued[True], continued[False], exact=True)


def test_a_folder_that_is_not_a_sharded_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(Exception, match=r"is a folder but not a sharded checkpoint \(it has no meta.pt\)"):
        fit_sharded(tmp_path / "run", 2, ckpt_path=tmp_path / "not_a_checkpoint")


def test_accumulated_micro_batches_train_like_one_process_and_send_once_per_window(tmp_path: Path) -> None:
    reports = fit_sharded(tmp_path, 6, accumulate=2, lr_scale=1.0)
    assert_same(reports[0]["params"], fit_one_process(6, accumulate=2, lr_scale=1.0), exact=False)
    for report in reports:
        for first, last in zip(report["batches"][::2], report["batches"][1::2], strict=True):
            # The window's first micro-batch sends nothing; its last sends the active block's summed gradients.
            assert sent(first) == (0, 0)
            assert sent(last) == (last["block_grad_bytes"], VERDICT_BYTES)


def test_a_sharded_checkpoint_continues_on_another_number_of_processes(tmp_path: Path) -> None:
    # torch.distributed.checkpoint cuts the saved shards to the new layout: here, one process holding everything.
    hift = {"layers_per_block": 2, "switch_every": 4, "save_distributed_checkpoint": True}
    fit_sharded(tmp_path / "first", 16, checkpoint_dir=tmp_path / "ckpt", stop_at=10, **hift)
    (ckpt,) = (tmp_path / "ckpt").iterdir()
    (continued,) = fit_sharded(tmp_path / "one", 16, ckpt_path=ckpt, world=1, **hift)
    assert_same(continued["params"], fit_one_process(16, layers_per_block=2, switch_every=4), exact=False)


class TensorParallel(ShardedTinyModule):
    """Applies a tensor-parallel plan to one layer, as a module written for ModelParallelStrategy may."""

    def configure_model(self) -> None:
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        parallelize_module(self.net.layers[0].up, self.device_mesh["tensor_parallel"], ColwiseParallel())


def test_a_tensor_parallel_plan_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(
        Exception, match=r"'net.layers.0.up.weight' is laid out on the device mesh \('tensor_parallel',\)"
    ):
        fit_sharded(tmp_path, 2, module_class=TensorParallel)


def test_a_module_wrapped_in_fsdp1_is_refused() -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_hift.fsdp import _refuse_unsupported

    module = ShardedTinyModule()
    wrapped = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # an FSDP1 wrapper, as isinstance sees it
    torch.nn.Module.__init__(wrapped)
    module.net.layers[0] = wrapped
    with pytest.raises(HiFTConfigError, match=r"FullyShardedDataParallel` \(FSDP1\). Remove that wrapping"):
        _refuse_unsupported(module, Trainer().strategy.precision_plugin)


def test_auto_plans_each_process_share_before_sharding_and_the_processes_agree(tmp_path: Path) -> None:
    """The trace runs on the whole model before FSDP2 splits it; the estimate is per process: weights, gradients and
    state split two ways, activations each process's own, one unit gathered whole."""
    reports = fit_sharded(tmp_path, 6, layers_per_block="auto", memory_budget="1GiB")
    units = 6
    assert [r["layers_per_block"] for r in reports] == [units, units]
    estimate = reports[0]["memory_estimate"]
    assert estimate == reports[1]["memory_estimate"]
    planned = estimate_per_rank(ShardedTinyModule(), WORLD, layers_per_block=units, prefetch=False)
    for kind in ("params", "grads", "optimizer_state", "gathered"):
        assert estimate[(kind, "device")] == planned.ranks["hift_fsdp"].get(kind, "device"), kind
    held = reports[0]["batches"][0]["memory"]
    assert held["params_device"] == estimate[("params", "device")]
    assert held["grads_device"] == estimate[("grads", "device")]
    assert estimate[("activations", "device")] > 0

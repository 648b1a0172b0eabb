"""HiFTDDPStrategy: two CPU processes (gloo) train like one process over the same global batch.

The multi-process runs start two processes each (Lightning's spawn launcher, and torchrun for the script
launcher); every process writes what it did with :class:`~tests.helpers.distributed.RankReport`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_hift import HiFTConfigError
from lightning_hift.ddp import GradientAverager, split_into_buckets
from lightning_hift.fsdp import ExitAfterExitHooksMixin
from tests.helpers.distributed import (
    WORLD,
    ExitWitness,
    MismatchedSeedDDP,
    ShardedTinyModule,
    assert_same,
    fit_one_process,
    fit_processes,
    load_reports,
    saved_masters,
)
from tests.helpers.lightning import HiFTDDPStrategy
from tests.helpers.modules import quiet_trainer
from tests.helpers.tiny_models import TINY_MODELS
from tests.helpers.tokenizers import word_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def python(*args: str, timeout: float | None = None, threads: str | None = "1") -> subprocess.CompletedProcess[str]:
    """``python *args`` from the repository root (``threads``: OMP_NUM_THREADS); it must succeed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)} | ({"OMP_NUM_THREADS": threads} if threads else {})
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize(
    "hift",
    [
        # At lr_scale="blocks" (x6) this set-up's AdamW steps are large enough to amplify the one-process run's other
        # summation order past the tolerance; the random-reset case runs at the default scale.
        {"accumulate": 2, "lr_scale": 1.0},
        {"order": "random", "optimizer_state": "reset", "layers_per_block": 2},
        # Every process measures the reduced gradients, so all draw the same blocks.
        {"order": "grad_norm", "lr_scale": 1.0},
    ],
    ids=["bottom2up-offload-accumulate2", "random-reset-m2", "grad_norm"],
)
@pytest.mark.integration
def test_two_processes_train_like_one_process_over_the_global_batch(tmp_path: Path, hift: dict[str, Any]) -> None:
    steps = 12  # two cycles of the six units (three of three blocks)
    reports = fit_processes(tmp_path, steps, **hift)  # rank 1 starts from skewed weights
    accumulate = hift.get("accumulate", 1)
    assert [r["world_size"] for r in reports] == [WORLD, WORLD]
    # Equal to each other and to one process: rank 1 started from rank 0's weights.
    assert_same(reports[0]["params"], reports[1]["params"], exact=True)
    assert_same(reports[0]["params"], fit_one_process(steps, **hift), exact=False)

    for report in reports:
        batches = report["batches"]
        assert len(batches) == steps * accumulate
        for i, batch in enumerate(batches):
            last_of_window = (i + 1) % accumulate == 0
            # Counted by torch's dispatcher: the active block's gradients, all-reduced once per optimizer step.
            assert batch["sent"]["all_reduce"] == (batch["block_grad_bytes"] if last_of_window else 0), i
        assert report["bytes_reduced"] == sum(b["sent"]["all_reduce"] for b in batches)
        assert report["bytes_reduced"] < steps * sum(p.nbytes for p in report["params"].values())


@pytest.mark.integration
def test_half_precision_weights_average_half_precision_grads_and_step_fp32_masters(tmp_path: Path) -> None:
    reports = fit_processes(tmp_path, 6, precision="bf16-true")
    assert_same(reports[0]["params"], reports[1]["params"], exact=True)
    for report in reports:
        assert all(p.dtype == torch.bfloat16 for p in report["params"].values())
        # bf16 gradients: half the bytes of fp32 ones, the active block's only.
        assert all(b["sent"]["all_reduce"] == b["block_grad_bytes"] for b in report["batches"])
    torch.manual_seed(0)  # the weights fit_processes starts from
    start = {n: p.to(torch.bfloat16) for n, p in ShardedTinyModule().named_parameters()}
    assert all(not torch.equal(start[n], p) for n, p in reports[0]["params"].items())  # every block was stepped


@pytest.mark.integration
@pytest.mark.parametrize(("precision", "switch_every"), [("32-true", 2), ("bf16-true", 1)])
def test_an_optimizer_that_calls_its_closure_twice_averages_every_call(
    tmp_path: Path, precision: str, switch_every: int
) -> None:
    # SAM: the second pass's gradients, taken at the ascended weights, are the ones stepped with. Unaveraged, each
    # process stepped with its own and the processes drifted apart; with switch_every=2 the next step read the
    # second pass's buckets, still in flight.
    hift = {"optimizer": "sam", "switch_every": switch_every, "lr_scale": 1.0}
    reports = fit_processes(tmp_path, 8, checkpoint_dir=tmp_path / "ckpt", precision=precision, **hift)
    assert_same(reports[0]["params"], reports[1]["params"], exact=True)
    for report in reports:
        # Each call's gradients are averaged: twice the active block's bytes every step.
        assert all(b["sent"]["all_reduce"] == 2 * b["block_grad_bytes"] for b in report["batches"])
    one_process_fp32 = fit_one_process(8, **hift)
    if precision == "32-true":
        assert_same(reports[0]["params"], one_process_fp32, exact=False)
    else:
        # The update lives in the fp32 masters (SAM's steps here are below bf16's resolution of the weights); bf16
        # arithmetic moves them 1e-5 from a fp32 run's weights, a pass without its gradients 2e-3.
        assert_same(saved_masters(tmp_path / "ckpt"), one_process_fp32, exact=False)


@pytest.mark.integration
def test_a_block_without_gradient_on_some_processes_is_averaged_with_zeros_or_skipped_by_all(tmp_path: Path) -> None:
    # Step 2 trains net.layers.1, which process 1 bypasses then; step 4 trains net.layers.3, bypassed by both. Before
    # the processes agreed, process 0 waited in all-reduce for process 1 until the timeout.
    reports = fit_processes(tmp_path, 6, skip_layers_at={0: {4}, 1: {2, 4}}, timeout=timedelta(seconds=60))
    assert_same(reports[0]["params"], reports[1]["params"], exact=True)
    torch.manual_seed(0)  # the weights fit_processes starts from (process 0's, broadcast)
    start = dict(ShardedTinyModule().named_parameters())
    params = reports[0]["params"]
    assert all(torch.equal(start[n], p) for n, p in params.items() if n.startswith("net.layers.3."))
    assert all(not torch.equal(start[n], p) for n, p in params.items() if n.startswith("net.layers.1."))


@pytest.mark.integration
def test_a_checkpoint_resumes_on_two_processes_and_on_one_and_back(tmp_path: Path) -> None:
    # Three blocks of two units, four steps each, six steps an epoch: step 10 is mid-slot, mid-cycle, mid-epoch.
    hift = {"layers_per_block": 2, "switch_every": 4}
    # The first run is set up for all 16 steps and stops at step 10, as an interrupted one would.
    fit_processes(tmp_path / "first", 16, checkpoint_dir=tmp_path / "ckpt", stop_at=10, **hift)
    (ckpt,) = (tmp_path / "ckpt").iterdir()  # written once, by rank 0
    assert torch.load(ckpt, weights_only=True)["global_step"] == 10

    resumed = fit_processes(tmp_path / "resumed", 16, ckpt_path=ckpt, **hift)
    uninterrupted = fit_processes(tmp_path / "full", 16, **hift)[0]["params"]
    assert_same(resumed[0]["params"], resumed[1]["params"], exact=True)
    assert_same(resumed[0]["params"], uninterrupted, exact=True)
    assert_same(fit_one_process(16, ckpt_path=ckpt, **hift), uninterrupted, exact=False)

    # And a one-process checkpoint continues on two processes.
    fit_one_process(16, checkpoint_dir=tmp_path / "ckpt_one", stop_at=10, **hift)
    (ckpt_one,) = (tmp_path / "ckpt_one").iterdir()
    continued = fit_processes(tmp_path / "continued", 16, ckpt_path=ckpt_one, **hift)
    assert_same(continued[0]["params"], uninterrupted, exact=False)


EXIT_SCRIPT = """
import atexit, sys
import torch.distributed as dist
from tests.helpers.distributed import ShardedTinyModule
from tests.helpers.modules import quiet_trainer

# Registered first, so it runs last: after whatever the fit registered.
atexit.register(lambda: print("process group at exit:", dist.is_initialized(), flush=True))
trainer = quiet_trainer(strategy=sys.argv[1], devices=1, max_steps=2, use_distributed_sampler=False)
trainer.fit(ShardedTinyModule(samples=16, batch_size=4))
print("process group after the fit:", dist.is_initialized(), flush=True)
"""


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["hift_ddp", "hift_fsdp"])
def test_the_process_group_is_destroyed_at_exit_while_the_interpreter_is_whole(strategy: str) -> None:
    # Left to the interpreter's final clean-up, gloo's threads could be torn down unjoined: an abort at the end of
    # some runs (SIGABRT, "terminate called without an active exception").
    result = python("-c", f"import lightning_hift\n{EXIT_SCRIPT}", strategy, timeout=300)
    assert "process group after the fit: True" in result.stdout  # kept for what the script does next
    assert "process group at exit: False" in result.stdout


@pytest.mark.integration
def test_torchrun_launches_the_script_launcher(tmp_path: Path) -> None:
    python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tests.helpers.ddp_script",
           str(tmp_path))  # fmt: skip
    reports = load_reports(tmp_path, WORLD)
    assert_same(reports[0]["params"], reports[1]["params"], exact=True)
    assert all(b["sent"]["all_reduce"] == b["block_grad_bytes"] for b in reports[0]["batches"])


@pytest.mark.integration
def test_processes_that_disagree_on_the_blocks_stop_before_training(tmp_path: Path) -> None:
    with pytest.raises(
        Exception, match=r"Process\(es\) \[1\] cut the model into different blocks, or have different HiFT settings"
    ):
        fit_processes(tmp_path, 2, strategy_class=MismatchedSeedDDP)


@pytest.mark.integration
def test_sync_batchnorm_is_refused(tmp_path: Path) -> None:
    trainer = quiet_trainer(strategy="hift_ddp_spawn", devices=WORLD, max_steps=2, sync_batchnorm=True)
    with pytest.raises(Exception, match="sync_batchnorm"):
        trainer.fit(ShardedTinyModule())


def test_bucket_size_must_be_positive() -> None:
    with pytest.raises(HiFTConfigError, match="bucket_cap_mb"):
        HiFTDDPStrategy(bucket_cap_mb=0)


def test_buckets_are_consecutive_runs_of_one_dtype_within_the_cap() -> None:
    tensors = [torch.zeros(4), torch.zeros(4), torch.zeros(10), torch.zeros(2, dtype=torch.float64), torch.zeros(1)]
    buckets = split_into_buckets(tensors, bucket_bytes=32)
    assert [[t.numel() for t in bucket] for bucket in buckets] == [[4, 4], [10], [2], [1]]


@pytest.fixture
def one_process_group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _block(sizes: list[int]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(n)) for n in sizes]


def test_buckets_start_during_backward_only_when_listening(one_process_group: None) -> None:
    params = _block([8, 8, 8, 8])
    averager = GradientAverager(params, bucket_bytes=64)  # two parameters (2 x 32 bytes) per bucket
    assert len(averager.buckets) == 2

    sum(p.sum() for p in params).backward()  # an accumulation micro-batch: nothing starts
    assert averager.collectives_total == 0
    averager.listening = True
    sum((p * 2).sum() for p in params).backward()
    assert averager.collectives_total == 2  # both buckets started inside backward
    averager.finish()
    assert averager.bytes_last_step == 4 * 8 * 4 + 4 * 4  # the gradients, and one presence flag per parameter
    for p in params:
        assert torch.equal(p.grad, torch.full((8,), 3.0))  # the average over one process is the gradient itself
    averager.close()


def test_a_parameter_without_gradient_on_any_process_keeps_none(one_process_group: None) -> None:
    params = _block([4, 4, 4])
    averager = GradientAverager(params, bucket_bytes=16)  # one parameter per bucket, started last-to-first
    averager.listening = True
    (params[0].sum() + params[2].sum()).backward()
    # params[2] is first in bucket order; params[1] never gets a gradient, so params[0]'s bucket waits for it.
    assert averager.collectives_total == 1
    averager.finish()
    assert averager.collectives_total == 3
    assert params[1].grad is None  # a zero gradient would still let the optimizer decay it
    assert not averager.missing_here
    assert torch.equal(params[0].grad, torch.ones(4))
    averager.close()
    params[0].grad = None
    averager.listening = True
    params[0].sum().backward()
    assert averager.collectives_total == 3  # hooks removed


def _average_on_two_ranks(grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Average one parameter's gradient, ``grads[r]`` on rank r, over two gloo ranks run as threads."""
    store = dist.HashStore()
    averaged: list[torch.Tensor | None] = [None, None]

    def rank(r: int) -> None:
        group = dist.ProcessGroupGloo(dist.PrefixStore("average", store), r, 2, timedelta(seconds=30))
        p = torch.nn.Parameter(torch.zeros_like(grads[r]))
        averager = GradientAverager([p], bucket_bytes=1 << 20, group=group)
        p.grad = grads[r].clone()
        averager.finish()
        averaged[r] = p.grad
        averager.close()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return averaged


def test_half_precision_gradients_are_divided_before_the_sum() -> None:
    # Two scaled fp16 gradients of 40000: their sum (80000) is past fp16's largest value (65504), their average is not.
    grad = torch.full((4,), 40000.0, dtype=torch.float16)
    for averaged in _average_on_two_ranks([grad, grad]):
        assert averaged is not None and torch.equal(averaged, grad)
    mixed = _average_on_two_ranks([torch.full((2,), 3.0), torch.full((2,), 5.0)])
    assert all(a is not None and torch.equal(a, torch.full((2,), 4.0)) for a in mixed)


@pytest.mark.slow
def test_the_benchmark_script_counts_less_traffic_for_hift(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    TINY_MODELS["bert-seqcls"]().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    methods = ("ddp", "hift_ddp_m1", "fsdp", "hift_fsdp_m1")
    python(str(ROOT / "experiments" / "ddp_benchmark.py"), "--model", str(model_dir), "--methods", *methods, "--steps",
           "3", "--out", str(tmp_path), threads=None)  # fmt: skip
    ddp, hift, fsdp, hift_fsdp = (json.loads((tmp_path / "ddp_runs" / f"{m}.json").read_text()) for m in methods)
    assert ddp["bytes_per_step"] == ddp["all_grad_bytes"]  # DDP sends every gradient every step
    assert 0 < hift["bytes_per_step"] < ddp["bytes_per_step"]
    # FSDP2 reduce-scatters every gradient (each process sends all of it) and gathers every weight twice (each
    # process contributing its half); HiFT on FSDP2 sends the active block's gradients, as on DDP.
    assert fsdp["bytes_per_step"] == fsdp["all_grad_bytes"] == fsdp["gathered_bytes_per_step"]
    # (hift_ddp also all-reduces which parameters got a gradient, FSDP2 pads shards: a few bytes apart.)
    assert hift_fsdp["bytes_per_step"] == pytest.approx(hift["bytes_per_step"], rel=0.01)
    assert 0 < hift_fsdp["gathered_bytes_per_step"] <= fsdp["gathered_bytes_per_step"]
    assert "| hift_ddp_m1 | 2 x 1 |" in (tmp_path / "ddp.md").read_text()


def test_auto_chooses_one_block_size_for_every_process(tmp_path: Path) -> None:
    reports = fit_processes(tmp_path, 3, layers_per_block="auto", memory_budget="1GiB")
    assert [r["layers_per_block"] for r in reports] == [6, 6]  # the whole model fits: one block of six units
    assert [len({b["block"] for b in r["batches"]}) for r in reports] == [1, 1]


def test_spawned_processes_end_after_their_exit_hooks_and_threads(tmp_path: Path) -> None:
    """The interpreter's final clean-up is where gloo's threads could be torn down before they are joined (a rare
    SIGABRT or SIGSEGV after a finished run): spawned processes end before it, with the launcher that ends them
    there, but only once their threads and atexit hooks have run, as at a normal exit."""
    trainer = quiet_trainer(
        strategy=HiFTDDPStrategy(start_method="spawn"),
        devices=WORLD,
        max_steps=2,
        use_distributed_sampler=False,
        callbacks=[ExitWitness(tmp_path)],
    )
    assert isinstance(trainer.strategy.launcher, ExitAfterExitHooksMixin)
    trainer.fit(ShardedTinyModule(samples=16, batch_size=4))
    found = sorted(path.name for path in tmp_path.iterdir())
    assert found == ["atexit0", "atexit1", "thread0", "thread1"]

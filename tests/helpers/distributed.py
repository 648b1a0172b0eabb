"""The multi-process tests' harness: ShardedTinyModule fitted on spawned CPU processes (gloo) under hift_ddp or
hift_fsdp, the same run on one process, the collective counter, and the callbacks that write down what each process
did."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from lightning_hift import partition
from lightning_hift.memory import snapshot
from tests.helpers.lightning import (
    Callback,
    HiFTCallback,
    HiFTDDPStrategy,
    HiFTFSDPStrategy,
    HiFTStrategy,
    LightningModule,
    ModelCheckpoint,
    Trainer,
)
from tests.helpers.modules import SkipOnce, TinyModule, quiet_trainer

SAMPLES, GLOBAL_BATCH = 48, 8  # 6 global batches an epoch
WORLD = 2


class ShardedTinyModule(TinyModule):
    """TinyModule whose process r reads samples r, r + W, r + 2W, ... in order (W processes).

    With ``batch_size = B / W`` the W processes together read, batch by batch, the same samples as one process
    with batch size B: the multi-process run and the one-process run are the same computation. (Lightning's own
    distributed sampler would shuffle.) A resumed epoch starts at the first batch the interrupted run had not
    trained on, as in ResumableTinyModule. Use with ``Trainer(use_distributed_sampler=False)``.

    With ``skew_by_rank``, process r adds r / 10 to every weight before the strategy sets up, so that the
    processes start the same only if the strategy broadcasts rank 0's weights.

    With ``skip_layers_at``, process r's forward bypasses the repeated layers (so they get no gradient) at the
    optimizer steps ``skip_layers_at[r]``: a branch taken on some processes only, as LayerDrop does.
    """

    def __init__(
        self, *args: Any, skew_by_rank: bool = False, skip_layers_at: dict[int, set[int]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.skew_by_rank = skew_by_rank
        self.skip_layers_at = skip_layers_at or {}

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.trainer.global_step not in self.skip_layers_at.get(self.trainer.global_rank, set()):
            return super().training_step(batch, batch_idx)
        tokens, labels = batch
        net = self.net
        return nn.functional.cross_entropy(net.head(net.norm(net.embed(tokens)).mean(dim=1)), labels)

    def setup(self, stage: str) -> None:
        if self.skew_by_rank:
            with torch.no_grad():
                for p in self.parameters():
                    p.add_(self.trainer.global_rank / 10)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        shard = range(trainer.global_rank, len(self.data), trainer.world_size)
        return DataLoader(self.data, batch_size=self.batch_size, sampler=SkipOnce(shard, done * self.batch_size))


def fit_processes(
    out: Path, max_steps: int, strategy_class: type = HiFTDDPStrategy, world: int = WORLD, **options: Any
) -> list[dict[str, Any]]:
    """Fits on ``world`` spawned processes, each on its share of every global batch of GLOBAL_BATCH samples, and
    returns what they wrote (:class:`ShardReport` under hift_fsdp, else :class:`RankReport`), rank 0 first. Process r
    starts from weights skewed by r / 10 unless the module is a subclass (those shard themselves, or fail).
    ``options``: as for :func:`fit_one_process`."""
    out.mkdir(parents=True, exist_ok=True)
    report = ShardReport(out) if issubclass(strategy_class, HiFTFSDPStrategy) else RankReport(out)
    _fit(strategy_class, world, max_steps, report=report, **options)
    return load_reports(out, world)


def load_reports(out: Path, world: int) -> list[dict[str, Any]]:
    """What the processes' RankReport wrote into ``out``, rank 0 first."""
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def fit_one_process(max_steps: int, **options: Any) -> dict[str, Tensor]:
    """The same run on one process over the whole global batch (its weights at the end). ``options``: the
    module's ``module_class``, ``optimizer`` ("adamw"), ``skip_layers_at``; the Trainer's ``precision`` ("32-true"),
    ``accumulate``, ``clip``, ``ckpt_path``; ``checkpoint_dir`` (one checkpoint, at ``stop_at`` or the end),
    ``stop_at`` (stops there, as an interruption would); the rest are the strategy's."""
    module = _fit(HiFTStrategy, 1, max_steps, **options)
    return {name: p.detach().clone() for name, p in module.named_parameters()}


_RUN_OPTIONS = ("clip", "ckpt_path", "checkpoint_dir", "stop_at")
_JOB: dict[str, Any] = dict(
    module_class=ShardedTinyModule, optimizer="adamw", skip_layers_at=None, precision="32-true", accumulate=1
)
"""What a run takes besides the strategy's arguments, with its defaults; ``clip``, ``ckpt_path``, ``checkpoint_dir``
and ``stop_at`` are None unless given."""


def _fit(strategy_class: type, world: int, max_steps: int, report: RankReport | None = None, **hift: Any) -> Any:
    job = {name: hift.pop(name, default) for name, default in _JOB.items()}
    clip, ckpt_path, checkpoint_dir, stop_at = (hift.pop(name, None) for name in _RUN_OPTIONS)
    torch.manual_seed(0)
    module_class = job["module_class"]
    module = module_class(
        optimizer=job["optimizer"],
        lr=1e-2,
        schedule=(2, 12),
        samples=SAMPLES,
        batch_size=GLOBAL_BATCH // world,
        skew_by_rank=report is not None and module_class is ShardedTinyModule,
        skip_layers_at=job["skip_layers_at"],
    )
    callbacks: list[Any] = [] if report is None else [report, HiFTCallback()]  # the report sees steps before a switch
    if checkpoint_dir is not None:
        every = stop_at or max_steps
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="{step}", every_n_train_steps=every))
    if stop_at is not None:
        callbacks.append(StopAt(stop_at))
    trainer = quiet_trainer(
        strategy=strategy_class(**hift) if report is None else strategy_class(start_method="spawn", **hift),
        devices=world,
        max_steps=max_steps,
        accumulate_grad_batches=job["accumulate"],
        gradient_clip_val=clip,
        precision=job["precision"],
        use_distributed_sampler=False,
        callbacks=callbacks,
        enable_checkpointing=checkpoint_dir is not None,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor], exact: bool) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            # Summing over processes rounds differently, and AdamW turns that into an update difference where a
            # gradient element is near its eps (up to 5e-5 seen over 12 steps, hift_ddp and hift_fsdp alike). A
            # wrong step moves a weight by about the learning rate: 1e-2 to 3e-2 here.
            diff = float((a[name] - b[name]).abs().max())
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=f"{name}: {diff:.2e}")


def saved_masters(folder: Path) -> dict[str, Tensor]:
    """The fp32 masters of the half-precision run whose one checkpoint is in ``folder``, by parameter name."""
    (ckpt,) = folder.iterdir()
    masters = torch.load(ckpt, weights_only=True)["hift_masters"]["masters"]
    torch.manual_seed(0)
    names = [name for block in partition(ShardedTinyModule()) for name in block.names]
    return dict(zip(names, masters, strict=True))


_c10d, _funcol = torch.ops.c10d, torch.ops._c10d_functional
_SENT = {  # op: (kind, position of the tensors it sends)
    _c10d.allreduce_: ("all_reduce", 0),
    _c10d.allreduce_coalesced_: ("all_reduce", 0),
    _c10d._reduce_scatter_base_: ("reduce_scatter", 1),
    _c10d.reduce_scatter_tensor_coalesced_: ("reduce_scatter", 1),
    _c10d._allgather_base_: ("all_gather", 1),
    _c10d.allgather_into_tensor_coalesced_: ("all_gather", 1),
    _c10d.broadcast_: ("broadcast", 0),
    _funcol.all_reduce: ("all_reduce", 0),
    _funcol.reduce_scatter_tensor: ("reduce_scatter", 0),
    _funcol.all_gather_into_tensor: ("all_gather", 0),
}


class Collectives(TorchDispatchMode):
    """Counts the bytes each kind of collective sent while it is entered (``sent``), whoever calls them and through
    whichever function (torch.distributed's or the functional ones): the tensors an all-reduce reduces or a
    broadcast sends, the whole input of a reduce-scatter, this process's part of an all-gather.

    It watches torch's dispatcher as torch's ``CommDebugMode`` does, over the same ops, but that mode is not used: it
    counts calls, not bytes, and its module tracker puts forward and backward hooks on every module, which changes the
    autograd graph of the run it watches and fails when an optimizer runs the forward again inside its step (SAM).
    A dispatch mode sees the thread that entered it and the backward passes that thread runs: on CPU, every
    collective of hift_ddp (buckets launched from gradient hooks included), of FSDP2 and of Lightning.
    """

    def __enter__(self) -> Collectives:
        self.sent = dict.fromkeys(("all_reduce", "reduce_scatter", "all_gather", "broadcast"), 0)
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs first; the collectives it calls come back here
        kind = _SENT.get(getattr(func, "_overloadpacket", None))
        if kind is not None:
            tensors = args[kind[1]]
            self.sent[kind[0]] += sum(t.nbytes for t in (tensors if isinstance(tensors, list) else [tensors]))
        return func(*args, **(kwargs or {}))


class RankReport(Callback):
    """What a process did, written to ``rank{global_rank}.pt`` in ``out`` when training ends: for every micro-batch
    the active block, the bytes its gradients take to exchange and the bytes each kind of collective sent while the
    batch ran (:class:`Collectives`, so independent of the strategy's own bookkeeping); the final weights."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.batches: list[dict[str, Any]] = []
        self.collectives: Collectives | None = None

    def block_grad_bytes(self, block: Any) -> int:
        """hift_ddp's: the block's gradients and, per parameter, one element saying whether this process had its
        gradient."""
        return sum(p.nbytes + p.element_size() for p in block.params)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        strategy: Any = trainer.strategy
        block = strategy.blocks[strategy.active_block]
        self.batches.append({"block": block.index, "block_grad_bytes": self.block_grad_bytes(block)})
        self.collectives = Collectives().__enter__()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._stop_counting()

    def on_exception(self, *args: Any) -> None:
        self._stop_counting()

    def _stop_counting(self) -> None:
        if self.collectives is not None:
            self.collectives.__exit__(None, None, None)
            self.batches[-1]["sent"] = self.collectives.sent
            self.collectives = None

    def report(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        strategy: Any = trainer.strategy
        return {
            "world_size": trainer.world_size,
            "params": {name: p.detach().clone() for name, p in pl_module.named_parameters()},
            "batches": self.batches,
            "bytes_reduced": getattr(strategy, "bytes_reduced", None),
            "layers_per_block": strategy.layers_per_block,
        }

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        torch.save(self.report(trainer, pl_module), self.out / f"rank{trainer.global_rank}.pt")


class ShardReport(RankReport):
    """RankReport for a sharded run. Per micro-batch also its share of the optimizer state, where each block's state
    rests, the measured gradient RMS and what the process holds, by kind and place; at the end the gathered weights,
    the skipped steps, what it holds of a consolidated checkpoint and the planner's estimate."""

    def block_grad_bytes(self, block: Any) -> int:
        return sum(p.nbytes for p in block.params)  # FSDP2 reduce-scatters the gradients alone

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        local = full = 0
        for state in trainer.optimizers[0].state.values():
            for value in state.values():
                if isinstance(value, DTensor):
                    local += value.to_local().nbytes
                    full += value.nbytes
        strategy: Any = trainer.strategy
        self.batches[-1].update(
            state_local_bytes=local,
            state_full_bytes=full,
            places=[strategy.placement.where(block) for block in strategy.blocks],
            grad_rms=strategy.last_grad_rms,
            memory={f"{kind}_{place}": n for (kind, place), n in snapshot(strategy).bytes.items()},
        )

    def report(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        params = get_model_state_dict(pl_module, options=options)  # every process takes part; process 0 gets it
        strategy: Any = trainer.strategy
        # What this process holds of a consolidated checkpoint (a collective: every process gathers).
        held = _tensor_bytes(strategy.optimizer_state(trainer.optimizers[0]))
        held += _tensor_bytes(strategy.masters.state_dict()) if strategy.masters is not None else 0
        estimate = None if strategy.memory_estimate is None else dict(strategy.memory_estimate.bytes)
        extra = {"skipped": strategy.skipped_nonfinite, "checkpoint_bytes": held, "memory_estimate": estimate}
        return super().report(trainer, pl_module) | {"params": params} | extra


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nest of dicts and lists."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class _SeedFromRank:
    """Gives each process a different seed, as a launch script that seeds from the rank by mistake would."""

    def setup(self, trainer: Trainer) -> None:
        self.seed = trainer.global_rank
        super().setup(trainer)  # type: ignore[misc]


class MismatchedSeedDDP(_SeedFromRank, HiFTDDPStrategy):
    pass


class MismatchedSeedFSDP(_SeedFromRank, HiFTFSDPStrategy):
    pass


class StopAt(Callback):
    """Stops training after optimizer step ``step``, as an interruption would, in a run set up for more steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


class ExitWitness(Callback):
    """In each process, at the end of training: an atexit hook that writes ``atexit{rank}``, and a non-daemon thread
    that writes ``thread{rank}`` a moment later (a normal exit waits for it)."""

    def __init__(self, out: str | Path) -> None:
        self.out = str(out)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import atexit

        rank = trainer.global_rank
        atexit.register(lambda: (Path(self.out) / f"atexit{rank}").write_text("ran"))

        def late() -> None:
            time.sleep(0.5)
            (Path(self.out) / f"thread{rank}").write_text("ran")

        threading.Thread(target=late, daemon=False).start()

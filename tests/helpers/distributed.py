"""What the multi-process tests need inside each process: a callback that writes down what the process did."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightning_hift.memory import snapshot
from tests.helpers.lightning import Callback, HiFTDDPStrategy, LightningModule, Trainer
from tests.helpers.modules import SkipOnce, TinyModule


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


class RankReport(Callback):
    """Counts the bytes each micro-batch all-reduces and saves the process's final weights and counts.

    Every call of ``torch.distributed.all_reduce`` made while a training batch runs is counted, whoever makes it,
    so the count is independent of the strategy's own bookkeeping. Writes ``rank{global_rank}.pt`` into ``out``.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = str(out)
        self.batches: list[dict[str, Any]] = []
        self._bytes = 0
        self._original: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._original = dist.all_reduce

        def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._bytes += tensor.nbytes
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce  # type: ignore[assignment]

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._original is not None:
            dist.all_reduce = self._original
            self._original = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        strategy: Any = trainer.strategy
        block = strategy.blocks[strategy.active_block]
        self._bytes = 0
        # The block's gradients and, per parameter, one element saying whether this process had its gradient.
        exchanged = sum(p.nbytes + p.element_size() for p in block.params)
        self.batches.append({"block": block.index, "block_grad_bytes": exchanged})

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.batches[-1].update(bytes=self._bytes, global_step=trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report = {
            "world_size": trainer.world_size,
            "params": {name: p.detach().clone() for name, p in pl_module.named_parameters()},
            "batches": self.batches,
            "bytes_reduced": trainer.strategy.bytes_reduced,  # type: ignore[attr-defined]
            "layers_per_block": trainer.strategy.layers_per_block,  # type: ignore[attr-defined]
        }
        torch.save(report, Path(self.out) / f"rank{trainer.global_rank}.pt")


def load_reports(out: str | Path, world_size: int) -> list[dict[str, Any]]:
    """The reports RankReport wrote, rank 0 first."""
    return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


class MismatchedSeedStrategy(HiFTDDPStrategy):
    """Gives each process a different seed, as a launch script that seeds from the rank by mistake would."""

    def setup(self, trainer: Trainer) -> None:
        self.seed = trainer.global_rank
        super().setup(trainer)


class StopAt(Callback):
    """Stops training after optimizer step ``step``, as an interruption would, in a run set up for more steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


class ShardReport(Callback):
    """What a process of a sharded run did: bytes reduce-scattered and all-reduced per micro-batch, its share of the
    optimizer state, and the gathered weights at the end. Writes ``rank{global_rank}.pt`` into ``out``.

    Every call of ``torch.distributed.reduce_scatter_single`` (what FSDP2 sends gradients with) and ``all_reduce``
    made while a training batch runs is counted, whoever makes it.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = str(out)
        self.batches: list[dict[str, Any]] = []
        self._sent = {"reduce_scatter": 0, "all_reduce": 0}
        self._originals: dict[str, Any] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for name, attribute in (("reduce_scatter", "reduce_scatter_single"), ("all_reduce", "all_reduce")):
            original = self._originals[attribute] = getattr(dist, attribute)

            def counting(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                tensor = kwargs.get("input", args[1] if _name == "reduce_scatter" and len(args) > 1 else None)
                tensor = tensor if tensor is not None else (args[0] if args else kwargs["tensor"])
                self._sent[_name] += tensor.nbytes
                return _original(*args, **kwargs)

            setattr(dist, attribute, counting)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for attribute, original in self._originals.items():
            setattr(dist, attribute, original)
        self._originals = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        strategy: Any = trainer.strategy
        block = strategy.blocks[strategy.active_block]
        self._sent = {"reduce_scatter": 0, "all_reduce": 0}
        self.batches.append({"block": block.index, "block_grad_bytes": sum(p.nbytes for p in block.params)})

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        optimizer = trainer.optimizers[0]
        local = full = 0
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, DTensor):
                    local += value.to_local().nbytes
                    full += value.nbytes
        strategy: Any = trainer.strategy
        places = [strategy.placement.where(block) for block in strategy.blocks]
        self.batches[-1].update(sent=dict(self._sent), state_local_bytes=local, state_full_bytes=full, places=places)
        self.batches[-1]["grad_rms"] = strategy.last_grad_rms
        self.batches[-1]["memory"] = {f"{kind}_{place}": n for (kind, place), n in snapshot(strategy).bytes.items()}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        params = get_model_state_dict(pl_module, options=options)  # every process takes part; process 0 gets it
        strategy: Any = trainer.strategy
        skipped = strategy.skipped_nonfinite
        # What this process holds of a consolidated checkpoint (a collective: every process gathers).
        held = _tensor_bytes(strategy.optimizer_state(trainer.optimizers[0]))
        held += _tensor_bytes(strategy.masters.state_dict()) if strategy.masters is not None else 0
        report = {
            "world_size": trainer.world_size,
            "params": params,
            "batches": self.batches,
            "skipped": skipped,
            "checkpoint_bytes": held,
            "layers_per_block": strategy.layers_per_block,
            "memory_estimate": None if strategy.memory_estimate is None else dict(strategy.memory_estimate.bytes),
        }
        torch.save(report, Path(self.out) / f"rank{trainer.global_rank}.pt")


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nest of dicts and lists."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


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

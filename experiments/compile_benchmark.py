"""torch.compile with and without HiFT: seconds per optimizer step, compile overhead and graphs compiled.

    python experiments/compile_benchmark.py             # an 8-layer Llama-like model, CPU, inductor
    python experiments/compile_benchmark.py --steps 3   # a quick look (numbers too noisy to quote)

Every run trains the same randomly initialised Llama-like model (``--hidden``, ``--layers``, ``--vocab``) on the same
random tokens (``--batch-size`` x ``--seq``). A compiled run passes ``torch.compile(lightning_module)`` to
``trainer.fit``, so that ``training_step`` (forward and loss) is compiled. Its ``training_step`` logs nothing: with
torch 2.13 and Lightning 2.6, dynamo fails inside ``self.log`` when it traces a compiled ``training_step``. A run
first trains ``--warmup``
optimizer steps (by default one HiFT cycle, in which every block trains once and every graph is compiled), then
``--steps`` timed ones. The runs:

* full / eager, full / compiled: Lightning's own ``strategy="auto"``, every parameter trained every step;
* hift / eager: ``HiFTStrategy()``, one unit (embeddings, a layer, the output end) per block;
* hift / compiled, whole model: HiFT with the model compiled as one graph, as before HiFT compiled by unit: dynamo
  recompiles it at every block switch until ``recompile_limit`` (8), then runs it eagerly;
* hift / compiled, by unit: HiFT as it is, each layer compiled on its own (``lightning_hift.compile``).

The table goes to ``--out``/compile.md (by default experiments/results/). Time steps on a quiet machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch._dynamo
import transformers as hf
from lightning.pytorch import Trainer, seed_everything
from run_summary import markdown
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_hift import HiFTStrategy
from lightning_hift.tasks import CausalLanguageModel, StepTimer

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Run:
    name: str
    hift: bool
    compiled: bool
    by_unit: bool = True


RUNS = (
    Run("full / eager", hift=False, compiled=False),
    Run("full / compiled", hift=False, compiled=True),
    Run("hift / eager", hift=True, compiled=False),
    Run("hift / compiled, whole model", hift=True, compiled=True, by_unit=False),
    Run("hift / compiled, by unit", hift=True, compiled=True),
)


class QuietCausalLM(CausalLanguageModel):
    """``CausalLanguageModel`` without ``self.log`` in ``training_step``, which dynamo cannot trace (see above)."""

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self(batch).loss
        return loss


class WholeModelHiFT(HiFTStrategy):
    """HiFT that leaves a compiled model as one graph: how compiled models trained before HiFT compiled by unit."""

    @override
    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        if self.compiled_by_unit is not None:
            self.compiled_by_unit.restore()
            self.compiled_by_unit = None


def make_model(args: argparse.Namespace) -> QuietCausalLM:
    config = hf.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
        use_cache=False,  # training: no key/value cache
    )
    return QuietCausalLM(hf.LlamaForCausalLM(config), lr=1e-4, warmup_ratio=0.0)


def make_data(args: argparse.Namespace, steps: int) -> DataLoader:
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab, (steps * args.batch_size, args.seq), generator=generator)
    return DataLoader([{"input_ids": row, "labels": row} for row in tokens], batch_size=args.batch_size)


def measure(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    torch._dynamo.reset()  # no graph of an earlier run is reused
    counters.clear()
    seed_everything(args.seed)
    module = make_model(args)
    strategy: Any = (WholeModelHiFT() if not run.by_unit else HiFTStrategy()) if run.hift else "auto"
    timer = StepTimer()
    steps = args.warmup + args.steps
    trainer = Trainer(
        accelerator="cpu",
        strategy=strategy,
        max_steps=steps,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    started = time.perf_counter()
    trainer.fit(torch.compile(module, backend=args.backend) if run.compiled else module, make_data(args, steps))
    warmup, timed = timer.seconds[: args.warmup], timer.seconds[args.warmup :]
    median = statistics.median(timed)
    return {
        "run": run.name,
        "median": median,
        "mean": statistics.mean(timed),
        # What the first steps took beyond steady steps: mostly compiling.
        "warmup_overhead": sum(warmup) - len(warmup) * median,
        "graphs": int(counters["stats"]["unique_graphs"]),
        "limit_hit": _recompile_limit_hits(),
        "wall": time.perf_counter() - started,
    }


def _recompile_limit_hits() -> int:
    # Dynamo records the fallback to eager as an unsupported feature named after the limit.
    return sum(
        count
        for kind in ("unimplemented", "graph_break")
        for reason, count in counters[kind].items()
        if "recompile limit" in str(reason).lower()
    )


def table(records: list[dict[str, Any]]) -> str:
    runs = pd.DataFrame(records)
    speed = runs["median"] / runs.set_index("run").reindex(["full / eager"])["median"].iloc[0]
    columns = {
        "run": runs.run,
        "median s/step": runs["median"].map("{:.3f}".format),
        "mean s/step": runs["mean"].map("{:.3f}".format),
        "vs full / eager": speed.map("{:.2f}x".format).where(speed.notna(), "-"),
        "warm-up overhead s": runs.warmup_overhead.map("{:.1f}".format),
        "graphs compiled": runs.graphs,
        "recompile limit hit": runs.limit_hit.map(lambda hits: "yes" if hits else "no"),
    }
    return markdown(pd.DataFrame(columns))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: two HiFT cycles)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: one HiFT cycle)")
    parser.add_argument("--layers", type=int, default=8, help="8 layers: 10 blocks, more than recompile_limit")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--runs", nargs="+", default=[run.name for run in RUNS], choices=[run.name for run in RUNS])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cycle = args.layers + 2  # units: the embeddings, each layer, the output end
    args.warmup = cycle if args.warmup is None else args.warmup
    args.steps = 2 * cycle if args.steps is None else args.steps
    records = []
    for run in RUNS:
        if run.name in args.runs:
            records.append(measure(run, args))
            print(f"{run.name}: {records[-1]['median']:.3f} s/step", file=sys.stderr)
    given = " ".join(argv if argv is not None else sys.argv[1:])
    report = (
        "# torch.compile with and without HiFT\n\n"
        f"Command: `python experiments/compile_benchmark.py {given}`  \n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, backend"
        f" {args.backend}.  \n"
        f"Model: Llama-like, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, random init; batch"
        f" {args.batch_size} x {args.seq} tokens; AdamW. {args.warmup} warm-up steps, then {args.steps} timed.\n\n"
        f"{table(records)}\n\n"
        "s/step: seconds per optimizer step over the timed steps (forward, backward, optimizer, HiFT's switch). A"
        " HiFT step's time depends on the active block (backward stops there), so the mean over whole cycles is its"
        " throughput. Warm-up overhead: the warm-up steps' time beyond as many median steps, mostly compiling."
        " Graphs compiled: dynamo's graphs over the whole run (counters['stats']['unique_graphs']). Recompile limit"
        " hit: dynamo gave up on a function after torch._dynamo.config.recompile_limit graphs and ran it eagerly.\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()

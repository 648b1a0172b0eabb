"""experiments/gpu_memory.py runs end to end; on a CPU it measures the process's peak RSS instead."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_memory_script_smoke_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    command = [sys.executable, "experiments/gpu_memory.py", "--shape", "tiny", "--device", "cpu", "--seq-len", "16"]
    subprocess.run([*command, "--precisions", "32-true", "bf16-true", "--out", str(out)], cwd=ROOT, check=True)
    table = out.read_text()
    assert table.count("| fpft |") == 2 and table.count("| hift |") == 2
    assert "OOM" not in table

"""scripts/bench_state_update.py times GPU kernels; on a machine without one it must still import, parse its
arguments and say why it stops (the timings themselves run in a GPU session)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_state_update.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_help_lists_shapes_and_options():
    out = run("--help")
    assert out.returncode == 0, out.stderr
    assert "mamba2-2.7b" in out.stdout and "--batch-sizes" in out.stdout and "do_bench_cudagraph" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the benchmark")
def test_without_a_gpu_it_stops_with_a_clear_message():
    out = run("--shapes", "mamba-2.8b", "--batch-sizes", "1")
    assert out.returncode != 0
    assert "needs a CUDA device" in out.stderr and "tests/kernels" in out.stderr

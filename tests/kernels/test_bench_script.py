"""scripts/bench_state_update.py times GPU kernels; on a machine without one it must still import, parse its
arguments and say why it stops (the timings themselves run in a GPU session)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_state_update.py"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=os.environ | env)


def test_help_lists_shapes_and_options():
    out = run("--help")
    assert out.returncode == 0, out.stderr
    assert "mamba2-2.7b" in out.stdout and "--batch-sizes" in out.stdout and "do_bench_cudagraph" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the benchmark")
def test_without_a_gpu_it_stops_with_a_clear_message():
    out = run("--shapes", "mamba-2.8b", "--batch-sizes", "1")
    assert out.returncode != 0
    assert "needs a CUDA device" in out.stderr and "tests/kernels" in out.stderr


@pytest.mark.slow
def test_dry_run_steps_the_composed_formats_through_the_kernel():
    """--dry-run: one fused step per variant on small shapes (here through Triton's interpreter), y checked
    against the torch twin; the presets resolve per family and report their stored bits."""
    pytest.importorskip("triton", exc_type=ImportError)
    out = run("--dry-run", "--batch-sizes", "2", "--variants", "int4-e4m3-hadamard", "gsq-4bit", "gsq-3bit",
              "int8", TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {tuple(line.split()[:3]): line.split() for line in out.stdout.splitlines()[1:]}
    assert len(rows) == 8
    assert rows[("mamba-2.8b", "2", "kernel-gsq-4bit")][3:5] == ["4.50", rows[("mamba-2.8b", "2",
                                                                                "kernel-int4-e4m3-hadamard")][4]]
    assert rows[("mamba-2.8b", "2", "kernel-gsq-3bit")][3] == "3.50"
    assert rows[("mamba-2.8b", "2", "kernel-gsq-3bit")][6] == "quasirandom"  # the Mamba-1 families' rounding
    assert rows[("mamba2-2.7b", "2", "kernel-gsq-3bit")][6] == "nearest"


@pytest.mark.slow
def test_dry_run_conv_rows_set_each_way_of_running_the_conv_against_the_torch_conv():
    """--conv: the conv launched before the state update, and (Mamba2 only) inside it, give the torch conv's y."""
    pytest.importorskip("triton", exc_type=ImportError)
    out = run("--dry-run", "--batch-sizes", "2", "--variants", "int8", "gsq-4bit", "--conv", "gsq-4bit",
              TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {tuple(line.split()[:3]): line.split() for line in out.stdout.splitlines()[1:]}
    conv = sorted((shape, method) for shape, _, method in rows if method.startswith("conv-"))
    assert conv == [("mamba-2.8b", "conv-kernel+kernel-gsq-4bit"), ("mamba2-2.7b", "conv-fused-gsq-4bit"),
                    ("mamba2-2.7b", "conv-kernel+kernel-gsq-4bit")]
    for shape, method in conv:
        assert float(rows[(shape, "2", method)][4]) <= 1e-2  # |Δy| / |y| against conv-torch+kernel
    refused = run("--dry-run", "--variants", "int8", "--conv", "int4", TRITON_INTERPRET="1")
    assert refused.returncode != 0 and "--conv int4: not among --variants" in refused.stderr

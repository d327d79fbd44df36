"""The fused kernels compile for an H200 (sm_90) on any machine: Triton's interpreter, which runs the twin
tests on CPU, accepts code that the GPU compiler rejects, so each specialization the composed formats add
(packed codes, e4m3 row-max pre-pass, Hadamard butterflies, mixed bases) is compiled to a cubin here.

Needs no GPU, but a process without ``TRITON_INTERPRET=1`` (under it ``triton.jit`` makes interpreted
functions; tests/conftest.py sets it on machines without a GPU): there, this file runs itself in a pytest
subprocess with ``TRITON_INTERPRET=0``. The launches are captured from `state_update` on CPU tensors, not run.
"""

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="the fused kernel needs triton: pip install 'gsq_hf[triton]'",
                             exc_type=ImportError)
pytest.importorskip("triton.backends.nvidia", reason="triton without its CUDA backend", exc_type=ImportError)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="this process compiles (test_kernels_compile_for_sm90)")
def test_kernels_compile_in_a_subprocess():
    env = os.environ | {"TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not subprocess",
                          __file__], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import gsq_hf.kernels.conv_step as conv_module  # noqa: E402
import gsq_hf.kernels.state_update as kernel_module  # noqa: E402
from gsq_hf.formats import get_format  # noqa: E402
from gsq_hf.kernels.reference import ConvStep  # noqa: E402
from gsq_hf.policies import EntropyThresholdPolicy, GateThresholdPolicy, StaticPolicy  # noqa: E402

F = get_format
N = 16
_POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8e4nv",
                  torch.int8: "i8", torch.uint8: "u8", torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}


def arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32"


def launches(monkeypatch, family: str, policy, conv: str | None = None, **options) -> list:
    """(kernel, positional args, keyword constants) of each launch `state_update` makes, captured, not run; with
    ``conv`` (a window format), Mamba2's step takes its conv inside and Mamba's runs `conv_step` first."""
    captured = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: captured.append((self.kernel, args, kwargs))

    for module, name in ((kernel_module, "_mamba_kernel"), (kernel_module, "_mamba2_kernel"),
                         (conv_module, "_conv_kernel")):
        monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the wrapper take CPU tensors; nothing is interpreted
    g = torch.Generator().manual_seed(0)
    if conv is not None:
        channels = 4 if family == "mamba" else 4 * 3 + 2 * N
        window = F(conv).quantize(torch.randn(2, channels, 4, generator=g), 4)
        step = ConvStep(window, torch.randn(2, channels, generator=g).bfloat16(),
                        torch.randn(channels, 4, generator=g).bfloat16(), torch.randn(channels).bfloat16())
        if family == "mamba":
            conv_module.conv_step(step)
        else:
            options["conv"] = step
    shape, A = ((2, 4, N), -torch.rand(4, N, generator=g)) if family == "mamba" else ((2, 4, 3, N), -torch.rand(4))
    state = torch.randn(*shape, generator=g)
    low = policy.low.quantize(state, N)
    high = policy.high.quantize(state, N) if policy.high is not None else None
    valid = torch.ones(2, 4, dtype=torch.bool) if high is not None else None
    x = torch.randn(*shape[:-1], generator=g)
    B = torch.randn(2, N) if family == "mamba" else torch.randn(2, 1, N)
    if "conv" in options:
        x = B = None
    kernel_module.state_update(low, high, valid, x, torch.rand(2, 4), A, B, B, torch.ones(4),
                               z=torch.randn(2, 4) if family == "mamba" else None, policy=policy,
                               row_signal=torch.tensor([0.2, 0.8]), return_gate=True, **options)
    return captured


@pytest.mark.skipif(INTERPRETED, reason="under TRITON_INTERPRET=1: test_kernels_compile_in_a_subprocess")
@pytest.mark.parametrize("family, policy, options", [
    ("mamba", StaticPolicy(F("midrise4-e4m3-hadamard")), dict(rounding="stochastic")),
    ("mamba2", GateThresholdPolicy(F("midrise3-e4m3-hadamard"), F("int8-e4m3"), 0.3), dict(
        rounding="stochastic", step=torch.zeros(1, dtype=torch.int64), scale_hold=0.5)),
    ("mamba", EntropyThresholdPolicy(F("int5-e8m0"), F("fp16-hadamard"), 0.5), dict(scale_hold=0.7)),
    ("mamba", StaticPolicy(F("int8")), dict(conv="int4")),  # the conv's own launch, then the state update's
    ("mamba2", StaticPolicy(F("midrise4-e4m3-hadamard")), dict(conv="int8-fp16")),  # conv inside both passes
    ("mamba", StaticPolicy(F("midrise4-e4m3up-hadamard")), dict(rounding="quasirandom", seed=2**40, step=3,
                                                                 scale_hold=0.85)),
    ("mamba2", GateThresholdPolicy(F("midrise3-e4m3-hadamard"), F("fp8"), 0.3), dict(
        rounding="quasirandom", step=torch.zeros(1, dtype=torch.int64))),
    ("mamba2", StaticPolicy(F("midrise4-log8-hadamard")), dict(scale_hold=0.85)),  # log2 / exp2 of log8 scales
], ids=["mamba-gsq-4bit-sr", "mamba2-gate-gsq-3bit/int8-e4m3-held", "mamba-entropy-int5-e8m0/fp16-hadamard-held",
        "mamba-conv-int4-bf16", "mamba2-gsq-4bit-conv-int8-fp16-bf16", "mamba-gsq-4bit-quasirandom-held",
        "mamba2-gate-gsq-3bit/fp8-quasirandom", "mamba2-log8-held"])
def test_kernels_compile_for_sm90(monkeypatch, family, policy, options):
    captured = launches(monkeypatch, family, policy, **options)
    passes = [True, False] if any(f.row_bytes for f in policy.formats) else [False]
    assert [kwargs.get("ROW_MAX_PASS") for _, _, kwargs in captured] == (
        [None] if family == "mamba" and "conv" in options else []) + passes
    held = [kwargs["HOLD"] for _, _, kwargs in captured if "HOLD" in kwargs]
    assert held and all(hold == ("scale_hold" in options) for hold in held)
    for kernel, args, kwargs in captured:
        constants = {k: v for k, v in kwargs.items() if k != "num_warps"}
        names = kernel.arg_names
        signature = {name: arg_type(value) for name, value in zip(names[:len(args)], args, strict=True)}
        signature |= {name: "constexpr" for name in constants}
        assert set(signature) == set(names)
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": kwargs["num_warps"]})
        assert compiled.asm["cubin"]

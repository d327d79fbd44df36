"""Time one layer's decode-step state update on a GPU: fp32 baselines, gsq_hf's torch path, the fused kernel.

    python scripts/bench_state_update.py --json results/bench_state_update.json

Shapes: the mamba-2.8b layer (d_inner 5120, d_state 16) and a Mamba2-2.7B layer (80 heads × 64, d_state 128,
1 group), batch 1…512, random inputs (the update's cost does not depend on trained weights). Methods:

  transformers-fp32  transformers' torch decode update (``mamba*_selective_state_update``), fp32 state
  mamba_ssm-fp32     ``mamba_ssm``'s Triton ``selective_state_update``, fp32 state (when importable)
  torch-<variant>    gsq_hf's torch path: ``gsq_hf.step.decode_step`` (read_ssm → ssm_step → write_ssm)
  torch-static-<v>   the same on a static cache (``GSQCache(static=True)``: in place, no host sync)
  kernel-<variant>   ``gsq_hf.kernels.state_update.state_update`` in place; ``kernel-fp32`` is the fused fp32
                     baseline every quantized variant has to beat

With ``--conv VARIANT ...`` the step's depthwise causal conv (width 4, window in the activation dtype, as the
default ``conv_format='auto'`` stores it) is timed with the state update of those variants, three ways:

  conv-torch+kernel-<v>   the torch conv a decode step runs today (`conv_step_reference`: the adapter's ops:
                          read and cast the window, cat, conv1d, SiLU, store the window), then the kernel
  conv-kernel+kernel-<v>  ``gsq_hf.kernels.conv_step.conv_step`` (one launch), then the kernel
  conv-fused-<v>          Mamba2 only: ``state_update(conv=...)``, conv and state update in one launch (Mamba-1's
                          B, C and Δ are x_proj of the whole conv output: it has no fused form)

Each conv row's ``x_torch_conv`` is the speed-up over ``conv-torch+kernel-<v>`` in the same mode. Mamba-1 rows
leave out x_proj/dt_proj (the same in all three), so they time conv + state update only.

Each method is timed plainly (``triton.testing.do_bench``: launches from Python included) and inside a CUDA
graph (``do_bench_cudagraph``: the kernel alone; ``--graph``: only there), except the default cache's torch
path, whose NaN probe syncs with the host and cannot be captured (its static twin can). Columns: median µs;
bytes one step must move (stored state read + written in its formats, scales, flags and the step's
inputs/outputs); achieved GB/s and its fraction of a measured device-to-device copy (read + write counted);
speed-up over ``kernel-fp32`` in the same mode. Variants with e4m3 group scales (``*-e4m3*``, the ``gsq-4bit``
/ ``gsq-3bit`` presets, resolved per family) launch a row-max pre-pass that reads the stored state once more;
their bytes count the one read the format needs. For ``kernel-fp32`` the ratio to ``mamba_ssm`` (same mode) is
checked against 1.10; without ``mamba_ssm`` the plain numbers are set against those recorded on an H200
(``../shared/MEASUREMENTS.md``). Kernel launch configurations (rows per program, warps) are tuned per shape on
the largest batch for ``--tune`` variants. Results go to ``--json`` after every batch size, so a run cut short
keeps what it measured.

Without a GPU, ``TRITON_INTERPRET=1 python scripts/bench_state_update.py --dry-run`` runs every variant's
kernel once on small versions of the shapes through Triton's interpreter and checks y against the torch
twin (no timings).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from gsq_hf.cli.common import run_script
from gsq_hf.config import GSQConfig, resolve_config

SHAPES = {
    "mamba-2.8b": dict(family="mamba", dim=5120, d_state=16),
    "mamba2-2.7b": dict(family="mamba2", heads=80, head_dim=64, d_state=128, groups=1),
}
VARIANTS = {  # name -> GSQConfig fields; --variants also takes preset names and YAML paths
    "fp32": dict(policy="static", format="fp32"),
    "bf16": dict(policy="static", format="bf16"),
    "fp16": dict(policy="static", format="fp16"),
    "fp8": dict(policy="static", format="fp8"),
    "int8": dict(policy="static", format="int8"),
    "int4": dict(policy="static", format="int4"),
    "int8-sr": dict(policy="static", format="int8", rounding="stochastic"),
    "int4-sr": dict(policy="static", format="int4", rounding="stochastic"),
    "gate-int8/fp16": dict(policy="gate", low_format="int8", high_format="fp16", threshold=0.3, high_when="open"),
    "gate-closed-int4/int8": dict(policy="gate", low_format="int4", high_format="int8", threshold=0.3,
                                  high_when="closed"),
    "entropy-int4/fp16": dict(policy="entropy", low_format="int4", high_format="fp16", threshold=0.5),
    "int8-e4m3": dict(policy="static", format="int8-e4m3"),
    "int4-e4m3": dict(policy="static", format="int4-e4m3"),
    "int8-e4m3-hadamard": dict(policy="static", format="int8-e4m3-hadamard"),
    "int4-e4m3-hadamard": dict(policy="static", format="int4-e4m3-hadamard"),
}
PRESETS = ("gsq-4bit", "gsq-3bit")  # midrise4/3-e4m3-hadamard, rounding per family (configs/*.yaml)
DRY_RUN_SHAPES = {  # --dry-run: the shapes' d_state, fewer channels / heads (the interpreter is slow)
    "mamba-2.8b": dict(family="mamba", dim=64, d_state=16),
    "mamba2-2.7b": dict(family="mamba2", heads=4, head_dim=8, d_state=128, groups=1),
}
# mamba_ssm's selective_state_update, fp32 state, H200, plain do_bench (its ~100 µs Python wrapper included)
RECORDED_MAMBA_SSM_US = {("mamba-2.8b", 1): 105, ("mamba-2.8b", 64): 95, ("mamba-2.8b", 256): 101,
                         ("mamba2-2.7b", 1): 102, ("mamba2-2.7b", 64): 106, ("mamba2-2.7b", 256): 407}
TUNE_ROWS = {"mamba": (32, 64, 128, 256), "mamba2": (4, 8, 16, 32)}  # rows per program tried by --tune


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16, 64, 256, 512])
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, *PRESETS],
                        help=f"state configs: {', '.join(VARIANTS)}, or a preset name ({', '.join(PRESETS)}, ...) "
                             "/ YAML path; presets resolve per family (family_overrides)")
    parser.add_argument("--tune", nargs="*", default=["fp32", "int8", "int4"],
                        help="variants whose kernel launch is tuned (others use the tuned int8 launch, else the "
                             "default); give none to use the defaults everywhere")
    parser.add_argument("--act-dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                        help="dtype of x, B, C, z, y (the state is whatever the method stores)")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--graph", action="store_true", help="only the CUDA-graph timings (graph mode)")
    parser.add_argument("--no-torch-path", action="store_true", help="skip gsq_hf's torch path (slow at large batch)")
    parser.add_argument("--warmup-ms", type=float, default=10.0)
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--conv", nargs="*", default=[], metavar="VARIANT",
                        help="also time the conv with the state update of these variants (rows conv-*; see above)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no timings: run every variant's kernel once on small shapes (CPU under "
                             "TRITON_INTERPRET=1, or CUDA), check y against the torch twin, print bytes and bits")
    return parser.parse_args(argv)


# -- inputs --------------------------------------------------------------------------------------------
def make_inputs(spec: dict, batch: int, act_dtype: torch.dtype, device: str) -> dict:
    """One decode step's inputs, shaped as the model passes them (dt before bias and softplus).

    Δ = softplus(dt + dt_bias) spreads over about [1e-3, 0.5], so the gate policies find units on both sides
    of their threshold (each row reports the fraction stored high).
    """
    g = torch.Generator(device=device).manual_seed(batch)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    n = spec["d_state"]
    if spec["family"] == "mamba":
        d = spec["dim"]
        A = -torch.arange(1, n + 1, device=device, dtype=torch.float32).expand(d, n).contiguous()  # the S4D-real init
        return dict(x=randn(batch, d, dtype=act_dtype), dt=2.0 * randn(batch, d) - 4.0, dt_bias=0.5 * randn(d), A=A,
                    B=randn(batch, n, dtype=act_dtype), C=randn(batch, n, dtype=act_dtype),
                    D=torch.ones(d, device=device), z=randn(batch, d, dtype=act_dtype),
                    state=randn(batch, d, n), row_signal=torch.rand(batch, generator=g, device=device))
    h, p, groups = spec["heads"], spec["head_dim"], spec["groups"]
    A = -torch.exp(torch.rand(h, generator=g, device=device) * math.log(16.0))  # Mamba2's init: -U[1, 16]
    return dict(x=randn(batch, h, p, dtype=act_dtype), dt=2.0 * randn(batch, h) - 4.0, dt_bias=0.5 * randn(h), A=A,
                B=randn(batch, groups, n, dtype=act_dtype), C=randn(batch, groups, n, dtype=act_dtype),
                D=torch.ones(h, device=device), z=None, state=randn(batch, h, p, n),
                row_signal=torch.rand(batch, generator=g, device=device))


def io_bytes(inputs: dict) -> int:
    """Bytes of everything a step reads and writes besides the state (y has x's size)."""
    names = ("x", "dt", "dt_bias", "A", "B", "C", "D", "z")
    return sum(inputs[k].nbytes for k in names if inputs[k] is not None) + inputs["x"].nbytes


def conv_inputs(spec: dict, batch: int, act_dtype: torch.dtype, device: str):
    """A decode step's conv: the window (width 4) stored in the activation dtype, the token's input, weights.

    Channels: d_inner on Mamba-1; Mamba2's xBC, x (H·P) then B and C (G·N each)."""
    from gsq_hf.formats import get_format
    from gsq_hf.kernels.reference import ConvStep

    g = torch.Generator(device=device).manual_seed(batch + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(act_dtype)

    if spec["family"] == "mamba":
        channels = spec["dim"]
    else:
        channels = spec["heads"] * spec["head_dim"] + 2 * spec["groups"] * spec["d_state"]
    window = get_format(act_dtype).quantize(randn(batch, channels, 4), 4)
    return ConvStep(window, randn(batch, channels), 0.5 * randn(channels, 4), randn(channels))


def conv_bytes(conv, fused: bool) -> int:
    """Bytes the conv adds to a step: the window read and written, the token's input, weight and bias, and (not
    fused) its output written (the state update's x, B, C reads are in `io_bytes`)."""
    extra = 2 * conv.window.nbytes + conv.u.nbytes + conv.weight.nbytes + conv.bias.nbytes
    return extra + (0 if fused else conv.u.nbytes)


def conv_methods(spec: dict, conv, first, call_args: list, kwargs: dict, launch: dict, inplace: bool = True) -> dict:
    """``conv-*`` method name (less the variant) -> step function, for the variant whose state `kernel_setup` made.

    ``call_args`` is ``[x, dt, A, B, C, D, z, dt_bias, softplus]``: the conv's output replaces x (and, Mamba2,
    B and C, split as the model splits xBC). ``inplace``: the state is updated in place, as in the kernel rows
    (``False``: each call steps from the same state)."""
    from gsq_hf.kernels.conv_step import conv_step
    from gsq_hf.kernels.reference import conv_step_reference, split_xBC
    from gsq_hf.kernels.state_update import state_update

    def step_after(out):
        args = list(call_args)
        if spec["family"] == "mamba":
            args[0] = out
        else:
            args[0], args[3], args[4] = split_xBC(out, spec["heads"], spec["head_dim"], spec["d_state"])
        return state_update(first.low, first.high, first.high_valid, *args, **kwargs, inplace=inplace, **launch)

    methods = {"conv-torch+kernel": lambda: step_after(conv_step_reference(conv)[0]),
               "conv-kernel+kernel": lambda: step_after(conv_step(conv)[0])}
    if spec["family"] == "mamba2":
        fused_args = list(call_args)
        fused_args[0] = fused_args[3] = fused_args[4] = None
        methods["conv-fused"] = lambda: state_update(first.low, first.high, first.high_valid, *fused_args, **kwargs,
                                                     inplace=inplace, conv=conv, **launch)
    return methods


# -- methods -------------------------------------------------------------------------------------------
def transformers_update(family: str):
    """transformers' torch decode update (unwrapped: the hub/mamba_ssm dispatch is bypassed)."""
    if family == "mamba":
        from transformers.models.mamba.modeling_mamba import mamba_selective_state_update as fn
    else:
        from transformers.models.mamba2.modeling_mamba2 import mamba2_selective_state_update as fn
    return inspect.unwrap(fn)


def mamba_ssm_update():
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except ImportError:
        return None
    return selective_state_update


def fp32_call(fn, family: str, inputs: dict, state: torch.Tensor):
    """A step of an upstream-style update ``fn(state, x, dt, A, B, C, ...)``, called as transformers calls it."""
    x, dt, A, D, bias = inputs["x"], inputs["dt"], inputs["A"], inputs["D"], inputs["dt_bias"]
    if family == "mamba":
        return lambda: fn(state, x, dt, A, inputs["B"], inputs["C"], D=D, z=inputs["z"], dt_bias=bias,
                          dt_softplus=True)
    p, n = x.shape[-1], state.shape[-1]  # Mamba2: per-head values broadcast over (P, N) with stride 0
    dt_e, A_e = dt[..., None].expand(-1, -1, p), A[:, None, None].expand(-1, p, n)
    D_e, bias_e = D[:, None].expand(-1, p), bias[:, None].expand(-1, p)
    return lambda: fn(state, x, dt_e, A_e, inputs["B"], inputs["C"], D=D_e, z=None, dt_bias=bias_e, dt_softplus=True)


def torch_path_call(config, spec: dict, inputs: dict, static: bool = False):
    """gsq_hf's torch decode step (`gsq_hf.step.decode_step` with ``kernel='torch'``) on a real `GSQStateLayer`
    (of a static cache: written in place, no host sync, capturable)."""
    import dataclasses

    from transformers import Mamba2Config, MambaConfig

    from gsq_hf.cache import GSQCache
    from gsq_hf.step import decode_step

    n = spec["d_state"]
    if spec["family"] == "mamba":
        model_config = MambaConfig(num_hidden_layers=1, hidden_size=spec["dim"] // 2, state_size=n)
    else:
        model_config = Mamba2Config(num_hidden_layers=1, num_heads=spec["heads"], head_dim=spec["head_dim"],
                                    state_size=n, n_groups=spec["groups"],
                                    hidden_size=spec["heads"] * spec["head_dim"] // 2)
    cache = GSQCache(model_config, dataclasses.replace(config, kernel="torch"), static=static)
    cache.row_signal = inputs["row_signal"]
    layer = cache.gsq_layer(0)
    state = inputs["state"]
    uses_gate = "gate" in cache.policy.signals
    layer.write_ssm(state, state.new_zeros(state.shape[:2]) if uses_gate else None, read_back=False)
    x, A, D = inputs["x"], inputs["A"], inputs["D"]
    z = inputs["z"] if spec["family"] == "mamba" else None

    def step():
        dt = F.softplus(inputs["dt"] + inputs["dt_bias"])
        return decode_step(layer, x, dt, A, inputs["B"], inputs["C"], D, z)

    return step


def kernel_unsupported(config, spec: dict, inputs: dict) -> str | None:
    """Why the fused kernel cannot run this config on this shape (None if it can)."""
    from gsq_hf.kernels import unsupported_reason

    policy = config.build_policy()
    probe = policy.low.quantize(inputs["state"][:1], config.group_size or spec["d_state"])
    return unsupported_reason(policy, probe, None, inputs["A"], inputs["z"], config.group_size)


def kernel_setup(config, inputs: dict):
    """Stored state in the config's formats, with the high flags a first step leaves (the steady state)."""
    from gsq_hf.kernels.state_update import state_update

    policy = config.build_policy()
    kwargs = dict(policy=policy, rounding=config.rounding, seed=config.seed, group_size=config.group_size,
                  row_signal=inputs["row_signal"], step=torch.zeros(1, dtype=torch.int64, device=inputs["x"].device))
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")] + [True]
    group = config.group_size or inputs["state"].shape[-1]
    low = policy.low.quantize(inputs["state"], group)
    high = policy.high.quantize(inputs["state"], group) if policy.high is not None else None
    first = state_update(low, high, None, *args, **kwargs)
    return policy, kwargs, args, first


def state_bytes(policy, inputs: dict, valid_in: torch.Tensor | None, valid_out: torch.Tensor | None,
                group: int) -> int:
    """Bytes of stored state one fused step reads and writes: each unit's read copy, every low copy, marked highs."""
    state = inputs["state"]
    units = state.shape[0] * state.shape[1]
    unit_elems = math.prod(state.shape[2:])
    low_b = policy.low.nbytes(unit_elems, group)
    row_b = 2 * state.shape[0] * (policy.low.row_bytes + (policy.high.row_bytes if valid_in is not None else 0))
    if valid_in is None:
        return 2 * units * low_b + row_b
    high_b = policy.high.nbytes(unit_elems, group)
    high_in, high_out = int(valid_in.sum()), int(valid_out.sum())
    read = high_in * high_b + (units - high_in) * low_b
    return read + units * low_b + high_out * high_b + 2 * units + row_b  # + valid flags, e4m3 row scales


# -- timing --------------------------------------------------------------------------------------------
def timed(fn, graph: bool, args) -> float:
    """Median µs of ``fn()``."""
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        return 1e3 * do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median")
    return 1e3 * do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")


def copy_bandwidth(args) -> float:
    """Device-to-device copy bandwidth in bytes/s, read + write counted (1 GiB buffers)."""
    src = torch.empty(2**28, device="cuda")
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), False, args) * 1e-6
    return 2 * src.nbytes / seconds


def tune_launch(config, inputs: dict, family: str, args) -> dict:
    """The fastest (block_rows, num_warps) for this shape at this batch, timed in a CUDA graph when possible."""
    from gsq_hf.kernels.state_update import state_update

    policy, kwargs, call_args, first = kernel_setup(config, inputs)
    best = None
    for rows in TUNE_ROWS[family]:
        for warps in (4, 8):
            def fn(rows=rows, warps=warps):
                return state_update(first.low, first.high, first.high_valid, *call_args, **kwargs, inplace=True,
                                    block_rows=rows, num_warps=warps)

            us = timed(fn, not args.no_graph, args)
            if best is None or us < best[0]:
                best = (us, rows, warps)
    return {"block_rows": best[1], "num_warps": best[2]}


# -- the dry run ---------------------------------------------------------------------------------------
def dry_run(args, configs: dict) -> None:
    """One fused step per shape and variant on small shapes, set against `state_update_reference`: the setup,
    the launch and the byte accounting of a timed run, without a GPU (TRITON_INTERPRET=1) and without timings."""
    from gsq_hf.kernels import state_update_reference
    from gsq_hf.kernels.state_update import state_update

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--dry-run without a CUDA device runs the kernel through Triton's interpreter: "
                 "TRITON_INTERPRET=1 python scripts/bench_state_update.py --dry-run")
    act_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.act_dtype]
    print(f"{'shape':12s} {'batch':>5s} {'method':28s} {'bits/elem':>9s} {'KB/step':>8s} {'|Δy|/|y|':>9s}  note")
    for shape in args.shapes:
        spec = DRY_RUN_SHAPES[shape]
        for batch in sorted(set(min(b, 4) for b in args.batch_sizes)):
            inputs = make_inputs(spec, batch, act_dtype, device)
            for name, config in configs.items():
                config = config.for_model_type(spec["family"])
                reason = kernel_unsupported(config, spec, inputs)
                if reason is not None:
                    print(f"{shape:12s} {batch:5d} kernel-{name:21s} {'—':>9s}  torch path only: {reason}")
                    continue
                policy, kwargs, call_args, first = kernel_setup(config, inputs)
                ours = state_update(first.low, first.high, first.high_valid, *call_args, **kwargs)
                twin = state_update_reference(first.low, first.high, first.high_valid, *call_args, **kwargs)
                error = float((ours.y.float() - twin.y.float()).abs().max() / twin.y.float().abs().max())
                group = config.group_size or spec["d_state"]
                nbytes = state_bytes(policy, inputs, first.high_valid, ours.high_valid, group) + io_bytes(inputs)
                bits = policy.low.bits_per_element(group)
                high = "" if ours.high_valid is None else f"high {float(ours.high_valid.float().mean()):.2f}"
                print(f"{shape:12s} {batch:5d} kernel-{name:21s} {bits:9.2f} {nbytes / 1e3:8.1f} {error:9.1e}  "
                      f"{config.rounding} {high}", flush=True)
                if not error <= 0.05:
                    sys.exit(f"kernel-{name} on {shape}: y differs from the torch twin by {error:.3g} of its scale")
                y = torch_path_call(config, spec, inputs, static=True)()  # the capturable torch path, once
                if not bool(torch.isfinite(y).all()):
                    sys.exit(f"torch-static-{name} on {shape}: a non-finite output")
                if name in args.conv:
                    dry_run_conv(spec, shape, batch, name, inputs, act_dtype, device, config)


def dry_run_conv(spec, shape, batch, name, inputs, act_dtype, device, config) -> None:
    """The ``conv-*`` methods of one variant once each, every y set against the torch conv's."""
    policy, kwargs, call_args, first = kernel_setup(config, inputs)
    conv = conv_inputs(spec, batch, act_dtype, device)
    methods = conv_methods(spec, conv, first, call_args, kwargs, {}, inplace=False)
    ys = {method: fn().y.float() for method, fn in methods.items()}
    base = ys.pop("conv-torch+kernel")
    group = config.group_size or spec["d_state"]
    for method, y in ys.items():
        error = float((y - base).abs().max() / base.abs().max())
        nbytes = (state_bytes(policy, inputs, first.high_valid, first.high_valid, group) + io_bytes(inputs)
                  + conv_bytes(conv, method == "conv-fused"))
        print(f"{shape:12s} {batch:5d} {method + '-' + name:28s} {'':9s} {nbytes / 1e3:8.1f} {error:9.1e}  "
              f"vs conv-torch+kernel-{name}", flush=True)
        if not error <= 0.05:
            sys.exit(f"{method}-{name} on {shape}: y differs from the torch conv's step by {error:.3g} of its scale")


# -- the run -------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    configs = {name: GSQConfig(name=name, **VARIANTS[name]) if name in VARIANTS else resolve_config(name)
               for name in args.variants}
    if set(args.conv) - set(configs):
        sys.exit(f"--conv {' '.join(sorted(set(args.conv) - set(configs)))}: not among --variants")
    if args.dry_run:
        return dry_run(args, configs)
    if not torch.cuda.is_available():
        sys.exit("bench_state_update.py times GPU kernels and needs a CUDA device; none was found. "
                 "For correctness on CPU run: TRITON_INTERPRET=1 python -m pytest -q tests/kernels")
    import triton

    import gsq_hf
    from gsq_hf.kernels.state_update import state_update

    act_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.act_dtype]
    bandwidth = copy_bandwidth(args)
    mamba_ssm = mamba_ssm_update()
    result = {"benchmark": "state_update", "device": torch.cuda.get_device_name(),
              "copy_bandwidth_GBps": bandwidth / 1e9, "act_dtype": args.act_dtype, "rep_ms": args.rep_ms,
              "mamba_ssm": mamba_ssm is not None, "launch": {}, "rows": [],
              "versions": {"torch": torch.__version__, "triton": triton.__version__, "gsq_hf": gsq_hf.__version__}}
    print(f"{result['device']}: device-to-device copy {bandwidth / 1e12:.2f} TB/s; mamba_ssm "
          f"{'found' if mamba_ssm else 'not importable (kernel-fp32 is set against recorded H200 numbers)'}",
          flush=True)
    print(f"{'shape':12s} {'batch':>5s} {'method':28s} {'mode':5s} {'µs':>9s} {'MB':>8s} {'GB/s':>7s} "
          f"{'%copy':>6s} {'×fp32k':>7s}  note", flush=True)

    def record(shape, batch, method, mode, us, nbytes, note="", **extra):
        row = dict(shape=shape, batch=batch, method=method, mode=mode, us=us, bytes=nbytes, note=note, **extra)
        if us is not None:
            row["GBps"] = nbytes / (us * 1e-6) / 1e9
            row["fraction_of_copy_bandwidth"] = row["GBps"] * 1e9 / bandwidth
        result["rows"].append(row)
        base = next((r["us"] for r in result["rows"] if (r["shape"], r["batch"], r["method"], r["mode"]) ==
                     (shape, batch, "kernel-fp32", mode) and r["us"]), None)
        row["speedup_vs_kernel_fp32"] = base / us if base and us else None
        text = (f"{us:9.1f} {nbytes / 1e6:8.2f} {row['GBps']:7.0f} {100 * row['fraction_of_copy_bandwidth']:5.1f}% "
                f"{row['speedup_vs_kernel_fp32'] or float('nan'):6.2f}×" if us is not None else f"{'—':>9s}")
        print(f"{shape:12s} {batch:5d} {method:28s} {mode:5s} {text}  {note}", flush=True)

    def measure(shape, batch, method, fn, nbytes, graph_ok=True, **extra):
        for mode in ("plain", "graph"):
            if mode == "graph" and (args.no_graph or not graph_ok) or mode == "plain" and args.graph:
                continue
            try:
                record(shape, batch, method, mode, timed(fn, mode == "graph", args), nbytes, **extra)
            except Exception as error:  # one failing method must not end the run
                traceback.print_exc(limit=2)
                record(shape, batch, method, mode, None, nbytes, note=f"error: {type(error).__name__}: {error}")

    for shape in args.shapes:
        spec = SHAPES[shape]
        family = spec["family"]
        family_configs = {name: config.for_model_type(family) for name, config in configs.items()}
        largest = make_inputs(spec, max(args.batch_sizes), act_dtype, "cuda")
        launches = {}
        for name in args.tune:
            if name in family_configs and kernel_unsupported(family_configs[name], spec, largest) is None:
                start = time.perf_counter()
                launches[name] = tune_launch(family_configs[name], largest, family, args)
                print(f"{shape}: tuned {name}: {launches[name]} ({time.perf_counter() - start:.0f} s)", flush=True)
        result["launch"][shape] = launches
        del largest

        for batch in args.batch_sizes:
            inputs = make_inputs(spec, batch, act_dtype, "cuda")
            fp32_bytes = 2 * inputs["state"].nbytes + io_bytes(inputs)
            state = inputs["state"].clone()
            measure(shape, batch, "transformers-fp32", fp32_call(transformers_update(family), family, inputs, state),
                    fp32_bytes)
            if mamba_ssm is not None:
                measure(shape, batch, "mamba_ssm-fp32", fp32_call(mamba_ssm, family, inputs, state), fp32_bytes)
            for name, config in family_configs.items():
                reason = kernel_unsupported(config, spec, inputs)
                if reason is not None:
                    record(shape, batch, f"kernel-{name}", "plain", None, 0, note=f"torch path only: {reason}")
                    continue
                policy, kwargs, call_args, first = kernel_setup(config, inputs)
                group = config.group_size or spec["d_state"]
                launch = launches.get(name, launches.get("int8", {}))
                nbytes = state_bytes(policy, inputs, first.high_valid, first.high_valid, group) + io_bytes(inputs)

                def fn(first=first, call_args=call_args, kwargs=kwargs, launch=launch):
                    return state_update(first.low, first.high, first.high_valid, *call_args, **kwargs, inplace=True,
                                        **launch)

                high = None if first.high_valid is None else float(first.high_valid.float().mean())
                measure(shape, batch, f"kernel-{name}", fn, nbytes, high_fraction=high, launch=launch)
                if not args.no_torch_path:
                    measure(shape, batch, f"torch-{name}", torch_path_call(config, spec, inputs), nbytes,
                            graph_ok=False, high_fraction=high)
                    measure(shape, batch, f"torch-static-{name}", torch_path_call(config, spec, inputs, static=True),
                            nbytes, high_fraction=high)
                if name in args.conv:
                    conv = conv_inputs(spec, batch, act_dtype, "cuda")
                    for method, conv_fn in conv_methods(spec, conv, first, call_args, kwargs, launch).items():
                        measure(shape, batch, f"{method}-{name}", conv_fn,
                                nbytes + conv_bytes(conv, method == "conv-fused"), launch=launch)
                    for row in result["rows"]:  # each conv row against today's path, same mode
                        if row["shape"] == shape and row["batch"] == batch and row["method"].startswith("conv-") \
                                and row["method"].endswith(f"-{name}") and row["us"]:
                            base = next((r["us"] for r in result["rows"] if (r["shape"], r["batch"], r["method"],
                                         r["mode"]) == (shape, batch, f"conv-torch+kernel-{name}", row["mode"])),
                                        None)
                            row["x_torch_conv"] = base / row["us"] if base else None
                del first
            ours = {r["mode"]: r["us"] for r in result["rows"]
                    if (r["shape"], r["batch"], r["method"]) == (shape, batch, "kernel-fp32") and r["us"]}
            for mode, us in ours.items():
                theirs = next((r["us"] for r in result["rows"] if (r["shape"], r["batch"], r["method"], r["mode"]) ==
                               (shape, batch, "mamba_ssm-fp32", mode) and r["us"]), None)
                source = "mamba_ssm"
                if theirs is None and mode == "plain" and (shape, batch) in RECORDED_MAMBA_SSM_US:
                    theirs, source = RECORDED_MAMBA_SSM_US[(shape, batch)], "recorded H200 mamba_ssm"
                if theirs is not None:
                    ratio = us / theirs
                    verdict = "within 10%" if ratio <= 1.10 else "SLOWER than allowed"
                    print(f"{shape:12s} {batch:5d} kernel-fp32 / {source} ({mode}): {ratio:.2f}, {verdict}",
                          flush=True)
                    result.setdefault("fp32_baseline_check", []).append(
                        dict(shape=shape, batch=batch, mode=mode, against=source, ratio=ratio))
            del inputs, state
            torch.cuda.empty_cache()
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_script(main)

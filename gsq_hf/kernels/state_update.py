"""Fused decode-step update of a quantized SSM state: one Triton pass per step.

Why: on a GPU the state update of a decode step is memory-bound, and an unfused quantized state (dequantize
→ fp32 update → quantize, three passes plus temporaries) runs 2–9× *slower* than the fp32 kernel it was
meant to beat (``../shared/MEASUREMENTS.md``). Here every stored byte is read once and written once: a
program loads its tile of the state in the stored format (the high copy where valid, else the low copy),
updates it in fp32 registers, computes the gate, picks each unit's format from the policy, re-quantizes
and stores the low copy (and the high copy + valid flag of the units marked high), and writes ``y``.

Kernels (row = one (batch, unit[, p]) vector of ``N`` = d_state values; groups of ``group_size`` along N
share an fp32 absmax scale, laid out as `gsq_hf.formats` stores them):

* `_mamba_kernel`: state (batch, D, N); grid (D / BLOCK, batch); ``exp(Δ·A)`` per (channel, n) as the
  model defines it; gate ``1 − mean_n exp(Δ·A_n)`` per channel; decisions per channel inside the tile.
* `_mamba2_kernel`: state (batch, H, P, N); grid (P / BLOCK, H, batch); one ``exp(Δ·A)`` per program, i.e.
  per head, never per element (a per-element exp made an earlier int8 kernel compute-bound); gate
  ``1 − exp(Δ·A)``; one decision per head.

Formats are compile-time constants; rounding is round-half-even or stochastic (Philox keyed by ``seed``,
counted by (element, ``step``, stream): steps differ, low and high copies draw independently). Float
formats are rounded onto their grid in fp32 arithmetic, so the final cast is exact on every backend (the
Triton interpreter truncates fp32→bf16). The same arithmetic is what `state_update_reference` does with
`gsq_hf.formats`; ``tests/kernels`` compares the two.

Dispatch: `gsq_hf.step.decode_step` calls `state_update` for a decode step where `gsq_hf.step.kernel_reason`
is None (the rules: there and in docs/design.md); it stores the returned copies (``inplace=False``:
`LayerStorage` stays immutable, so checkpoints stay references), takes the write statistics from
``high_valid``, steps the noise with the layer's write counter, and redoes a step whose output is NaN/Inf on
the torch path. Timings on an H200: ``docs/performance.md``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..formats import QuantizedTensor, StateFormat
from ..policies import PrecisionPolicy, Signals
from .reference import StateUpdate, empty_storage, unsupported_reason

__all__ = ["state_update"]

_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)  # the floor of a group scale, as in gsq_hf.formats


# -- rounding and storage helpers ----------------------------------------------------------------------
@triton.jit
def _rne(v):
    """Round half to even, exact for |v| < 2**22: adding 1.5 * 2**23 leaves no fraction bits to keep.

    libdevice's rint would do, but the interpreter has no libdevice.
    """
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _pow2(e):
    """2**e in fp32 for int32 ``e`` in [-126, 127], built from the exponent bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_float_grid(x, u, MBITS: tl.constexpr, MIN_EXP: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Round fp32 ``x`` onto the grid of a float format with MBITS mantissa bits and smallest exponent MIN_EXP.

    The spacing at x is 2**(max(floor(log2|x|), MIN_EXP) − MBITS) (subnormals share the smallest binade's
    spacing), as in `gsq_hf.formats`. x / spacing = x · 2**p is formed with two in-range powers of two
    (p reaches 133 for bf16), so scaling and unscaling are exact; the result is representable in the format.
    """
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2|x|); −127 for 0 and subnormals
    p = MBITS - tl.maximum(exponent, MIN_EXP)
    half = p >> 1
    rest = p - half
    scaled = x * _pow2(half) * _pow2(rest)  # |scaled| < 2**(MBITS + 1)
    if STOCHASTIC:
        lower = tl.floor(scaled)
        rounded = lower + (u < scaled - lower).to(tl.float32)
    else:
        rounded = _rne(scaled)
    return rounded * _pow2(-rest) * _pow2(-half)


@triton.jit
def _uniform(seed, step, STREAM: tl.constexpr, rows, ROWS: tl.constexpr, N: tl.constexpr):
    """Uniform [0, 1) noise (ROWS, N) for stochastic rounding: one Philox call per four elements.

    Counter = (element quad, step, stream): independent across elements, steps and the low/high copies.
    """
    quad = rows[:, None] * (N // 4) + tl.arange(0, N // 4)[None, :]  # (ROWS, N/4) int64
    zero = quad.to(tl.uint32) * 0
    r0, r1, r2, r3 = tl.philox(seed, quad.to(tl.uint32), (quad >> 32).to(tl.uint32), (zero + step).to(tl.uint32),
                               zero + STREAM)
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (ROWS, N))
    return tl.uint_to_uniform_float(bits)


@triton.jit
def _load_state(data_ptr, scale_ptr, rows, mask, FMT: tl.constexpr, SCALED: tl.constexpr,
                N: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """The fp32 values (ROWS, N) of stored ``rows``; masked-off rows move no bytes (their values are never stored)."""
    if FMT == "int4":  # byte i holds elements 2i (low nibble) and 2i + 1, offset by 8
        packed = tl.load(data_ptr + rows[:, None] * (N // 2) + tl.arange(0, N // 2)[None, :], mask=mask[:, None],
                         other=0)
        even = (packed & 0xF).to(tl.float32) - 8.0
        odd = (packed >> 4).to(tl.float32) - 8.0
        values = tl.reshape(tl.join(even, odd), (ROWS, N))
    else:
        values = tl.load(data_ptr + rows[:, None] * N + tl.arange(0, N)[None, :], mask=mask[:, None]).to(tl.float32)
    if SCALED:
        scale = tl.load(scale_ptr + rows[:, None] * (N // GROUP) + tl.arange(0, N // GROUP)[None, :],
                        mask=mask[:, None], other=0.0)  # (ROWS, N / GROUP)
        values = tl.reshape(tl.reshape(values, (ROWS, N // GROUP, GROUP)) * scale[:, :, None], (ROWS, N))
    return values


@triton.jit
def _store_state(h, data_ptr, scale_ptr, rows, mask, seed, step, STREAM: tl.constexpr, FMT: tl.constexpr,
                 SCALED: tl.constexpr, MAX_CODE: tl.constexpr, MBITS: tl.constexpr, MIN_EXP: tl.constexpr,
                 STOCHASTIC: tl.constexpr, N: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """Quantize fp32 ``h`` (ROWS, N) into ``FMT`` and store the ``rows`` where ``mask``.

    As `StateFormat.quantize`: scale = absmax / MAX_CODE per group, values over max(scale, tiny), int codes
    rounded (floor(v + u) clamped when stochastic), floats clamped to ±MAX_CODE and rounded onto the format's
    grid. One difference, for speed: values are multiplied by the group's reciprocal scale (one IEEE
    division per group, not per element), which moves a code only where a value is within an ulp of a tie.
    """
    u = _uniform(seed, step, STREAM, rows, ROWS, N) if STOCHASTIC else 0.0
    v = h
    if SCALED:
        groups = tl.reshape(h, (ROWS, N // GROUP, GROUP))
        scale = tl.div_rn(tl.max(tl.abs(groups), axis=2), MAX_CODE)  # (ROWS, N / GROUP)
        tl.store(scale_ptr + rows[:, None] * (N // GROUP) + tl.arange(0, N // GROUP)[None, :], scale,
                 mask=mask[:, None])
        inverse = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), tl.maximum(scale, _TINY))  # (ROWS, N / GROUP)
        v = tl.reshape(groups * inverse[:, :, None], (ROWS, N))
    if FMT == "int8" or FMT == "int4":
        if STOCHASTIC:
            codes = tl.minimum(tl.maximum(tl.floor(v + u), -MAX_CODE), MAX_CODE)
        else:
            codes = _rne(v)
        if FMT == "int4":
            even, odd = tl.split(tl.reshape(codes.to(tl.int32) + 8, (ROWS, N // 2, 2)))
            tl.store(data_ptr + rows[:, None] * (N // 2) + tl.arange(0, N // 2)[None, :],
                     (even | (odd << 4)).to(tl.uint8), mask=mask[:, None])
        else:
            tl.store(data_ptr + rows[:, None] * N + tl.arange(0, N)[None, :], codes.to(tl.int8), mask=mask[:, None])
    else:
        if FMT != "fp32":
            v = _round_to_float_grid(tl.minimum(tl.maximum(v, -MAX_CODE), MAX_CODE), u, MBITS, MIN_EXP, STOCHASTIC)
        tl.store(data_ptr + rows[:, None] * N + tl.arange(0, N)[None, :], v.to(data_ptr.dtype.element_ty),
                 mask=mask[:, None])


@triton.jit
def _softplus(v):
    """torch's softplus (identity above 20) with log1p by Goldberg's trick (no libdevice in the interpreter)."""
    e = tl.exp(v)
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.where(v > 20.0, v, log1p)


@triton.jit
def _delta(dt_ptr, dt_bias_ptr, index, bias_index, mask, dt_min, dt_max,
           HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr):
    """Δ = clamp(softplus(dt + dt_bias)) in fp32, as `gsq_hf.kernels.reference.delta`."""
    dt = tl.load(dt_ptr + index, mask=mask, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + bias_index, mask=mask, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        dt = _softplus(dt)
    return tl.minimum(tl.maximum(dt, dt_min), dt_max)


@triton.jit
def _read(low_ptr, low_scale_ptr, high_ptr, high_scale_ptr, valid_ptr, units, rows, mask,
          LOW: tl.constexpr, LOW_SCALED: tl.constexpr, HIGH: tl.constexpr, HIGH_SCALED: tl.constexpr,
          READ_HIGH: tl.constexpr, N: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """The state a reader sees (ROWS, N): a row loads only its high copy (where its unit's flag is set) or its low.

    ``units`` (ROWS,) is the policy unit of each row (the row itself for Mamba, its head for Mamba2).
    """
    if READ_HIGH:
        valid = tl.load(valid_ptr + units, mask=mask, other=0) != 0  # (ROWS,)
        from_high = _load_state(high_ptr, high_scale_ptr, rows, mask & valid, HIGH, HIGH_SCALED, N, GROUP, ROWS)
        from_low = _load_state(low_ptr, low_scale_ptr, rows, mask & ~valid, LOW, LOW_SCALED, N, GROUP, ROWS)
        return tl.where(valid[:, None], from_high, from_low)
    else:
        return _load_state(low_ptr, low_scale_ptr, rows, mask, LOW, LOW_SCALED, N, GROUP, ROWS)


@triton.jit
def _choose(gate, row_high_ptr, b, threshold, POLICY: tl.constexpr):
    """The policy's high mask, shaped like ``gate``: gate ≥ threshold (open), < threshold (closed), the row flag."""
    if POLICY == "open":
        return gate >= threshold
    elif POLICY == "closed":
        return gate < threshold
    else:  # "row": the entropy policy, whose row signal the wrapper turned into a flag
        return tl.zeros(gate.shape, tl.int1) | (tl.load(row_high_ptr + b) != 0)


# -- the kernels ---------------------------------------------------------------------------------------
@triton.jit
def _mamba_kernel(
    low_ptr, low_scale_ptr, high_ptr, high_scale_ptr, valid_ptr,  # stored state, read
    out_low_ptr, out_low_scale_ptr, out_high_ptr, out_high_scale_ptr, out_valid_ptr,  # stored state, written
    x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, gate_ptr, row_high_ptr,
    dim, stride_x, stride_dt, stride_B, stride_C, stride_z, stride_y,  # batch strides; inner dims contiguous
    dt_min, dt_max, threshold, seed, step,
    N: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
    LOW: tl.constexpr, LOW_SCALED: tl.constexpr, LOW_MAX: tl.constexpr, LOW_MBITS: tl.constexpr,
    LOW_MIN_EXP: tl.constexpr,
    HIGH: tl.constexpr, HIGH_SCALED: tl.constexpr, HIGH_MAX: tl.constexpr, HIGH_MBITS: tl.constexpr,
    HIGH_MIN_EXP: tl.constexpr,
    POLICY: tl.constexpr, READ_HIGH: tl.constexpr, STOCHASTIC: tl.constexpr, STEP_IN_MEMORY: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    WRITE_GATE: tl.constexpr,
):
    """Mamba: state (batch, D, N); one program = BLOCK channels (= units = rows) of one batch row."""
    b = tl.program_id(1)
    d = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) channels
    mask = d < dim
    rows = b.to(tl.int64) * dim + d  # (BLOCK,)
    n = tl.arange(0, N)
    if STEP_IN_MEMORY:
        step = tl.load(step)

    x = tl.load(x_ptr + b * stride_x + d, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    dt = _delta(dt_ptr, dt_bias_ptr, b * stride_dt + d, d, mask, dt_min, dt_max, HAS_DT_BIAS, DT_SOFTPLUS)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask[:, None], other=0.0).to(tl.float32)  # (BLOCK, N)
    B = tl.load(B_ptr + b * stride_B + n).to(tl.float32)  # (N,)
    C = tl.load(C_ptr + b * stride_C + n).to(tl.float32)  # (N,)
    dA = tl.exp(dt[:, None] * A)  # (BLOCK, N): A differs per (channel, n)

    state = _read(low_ptr, low_scale_ptr, high_ptr, high_scale_ptr, valid_ptr, rows, rows, mask, LOW, LOW_SCALED,
                  HIGH, HIGH_SCALED, READ_HIGH, N, GROUP, BLOCK)
    h = dA * state + (dt[:, None] * B[None, :]) * x[:, None]  # (BLOCK, N)

    y = tl.sum(h * C[None, :], axis=1)  # (BLOCK,)
    if HAS_D:
        y += x * tl.load(D_ptr + d, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * stride_z + d, mask=mask, other=0.0).to(tl.float32)
        y *= z / (1.0 + tl.exp(-z))  # silu
    tl.store(y_ptr + b * stride_y + d, y, mask=mask)

    _store_state(h, out_low_ptr, out_low_scale_ptr, rows, mask, seed, step, 0, LOW, LOW_SCALED, LOW_MAX, LOW_MBITS,
                 LOW_MIN_EXP, STOCHASTIC, N, GROUP, BLOCK)
    gate = 1.0 - tl.sum(dA, axis=1) / N  # (BLOCK,)
    if POLICY != "static":
        high = _choose(gate, row_high_ptr, b, threshold, POLICY)  # (BLOCK,)
        _store_state(h, out_high_ptr, out_high_scale_ptr, rows, mask & high, seed, step, 1, HIGH, HIGH_SCALED,
                     HIGH_MAX, HIGH_MBITS, HIGH_MIN_EXP, STOCHASTIC, N, GROUP, BLOCK)
        tl.store(out_valid_ptr + rows, high, mask=mask)
    if WRITE_GATE:
        tl.store(gate_ptr + rows, gate, mask=mask)


@triton.jit
def _mamba2_kernel(
    low_ptr, low_scale_ptr, high_ptr, high_scale_ptr, valid_ptr,  # stored state, read
    out_low_ptr, out_low_scale_ptr, out_high_ptr, out_high_scale_ptr, out_valid_ptr,  # stored state, written
    x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, gate_ptr, row_high_ptr,
    head_dim, heads_per_group, stride_x, stride_dt, stride_B, stride_C, stride_y,  # batch strides
    dt_min, dt_max, threshold, seed, step,
    N: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
    LOW: tl.constexpr, LOW_SCALED: tl.constexpr, LOW_MAX: tl.constexpr, LOW_MBITS: tl.constexpr,
    LOW_MIN_EXP: tl.constexpr,
    HIGH: tl.constexpr, HIGH_SCALED: tl.constexpr, HIGH_MAX: tl.constexpr, HIGH_MBITS: tl.constexpr,
    HIGH_MIN_EXP: tl.constexpr,
    POLICY: tl.constexpr, READ_HIGH: tl.constexpr, STOCHASTIC: tl.constexpr, STEP_IN_MEMORY: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, WRITE_GATE: tl.constexpr,
):
    """Mamba2: state (batch, H, P, N); one program = BLOCK rows p of one head (= unit) of one batch row."""
    b = tl.program_id(2)
    head = tl.program_id(1)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = p < head_dim
    unit = b.to(tl.int64) * tl.num_programs(1) + head
    units = tl.zeros((BLOCK,), tl.int64) + unit  # (BLOCK,): every row of the tile belongs to this head
    rows = unit * head_dim + p  # (BLOCK,)
    n = tl.arange(0, N)
    group = head // heads_per_group
    if STEP_IN_MEMORY:
        step = tl.load(step)

    dt = _delta(dt_ptr, dt_bias_ptr, b * stride_dt + head, head, True, dt_min, dt_max, HAS_DT_BIAS, DT_SOFTPLUS)
    dA = tl.exp(dt * tl.load(A_ptr + head).to(tl.float32))  # scalar: one exp per head
    x = tl.load(x_ptr + b * stride_x + head * head_dim + p, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    B = tl.load(B_ptr + b * stride_B + group * N + n).to(tl.float32)  # (N,)
    C = tl.load(C_ptr + b * stride_C + group * N + n).to(tl.float32)  # (N,)

    state = _read(low_ptr, low_scale_ptr, high_ptr, high_scale_ptr, valid_ptr, units, rows, mask, LOW, LOW_SCALED,
                  HIGH, HIGH_SCALED, READ_HIGH, N, GROUP, BLOCK)
    h = dA * state + (dt * x)[:, None] * B[None, :]  # (BLOCK, N)

    y = tl.sum(h * C[None, :], axis=1)  # (BLOCK,)
    if HAS_D:
        y += x * tl.load(D_ptr + head).to(tl.float32)
    tl.store(y_ptr + b * stride_y + head * head_dim + p, y, mask=mask)

    _store_state(h, out_low_ptr, out_low_scale_ptr, rows, mask, seed, step, 0, LOW, LOW_SCALED, LOW_MAX, LOW_MBITS,
                 LOW_MIN_EXP, STOCHASTIC, N, GROUP, BLOCK)
    gate = tl.full((BLOCK,), 1.0, tl.float32) - dA  # (BLOCK,), one value
    first = mask & (p == 0)  # the per-head outputs are written once
    if POLICY != "static":
        high = _choose(gate, row_high_ptr, b, threshold, POLICY)  # (BLOCK,), one value
        _store_state(h, out_high_ptr, out_high_scale_ptr, rows, mask & high, seed, step, 1, HIGH, HIGH_SCALED,
                     HIGH_MAX, HIGH_MBITS, HIGH_MIN_EXP, STOCHASTIC, N, GROUP, BLOCK)
        tl.store(out_valid_ptr + units, high, mask=first)
    if WRITE_GATE:
        tl.store(gate_ptr + units, gate, mask=first)


# -- the wrapper ---------------------------------------------------------------------------------------
def _format_constants(prefix: str, fmt: StateFormat) -> dict:
    return {prefix: fmt.name, f"{prefix}_SCALED": fmt.scaled, f"{prefix}_MAX": float(fmt.max_code),
            f"{prefix}_MBITS": fmt.mantissa_bits, f"{prefix}_MIN_EXP": fmt.min_exponent}


def _batch_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` with contiguous dims after the batch dim (copied only if not), and its batch stride."""
    if not t[0].is_contiguous():
        t = t.contiguous()
    return t, t.stride(0)


def _storage_pointers(q: QuantizedTensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) of a stored copy; ``fallback`` stands in for what the kernel never touches."""
    if q is None:
        return fallback, fallback
    for t in (q.data, q.scale):
        if t is not None and not t.is_contiguous():
            raise ValueError("stored state tensors must be contiguous (as gsq_hf.formats makes them)")
    return q.data, q.scale if q.scale is not None else fallback


def default_block(length: int, d_state: int) -> int:
    """Rows per program along a dim of ``length`` (channels D, or head_dim P): tiles of about 2048 values.

    The bench script sweeps others (``block_rows``).
    """
    return min(triton.next_power_of_2(length), max(1, 2048 // d_state))


def state_update(
    low: QuantizedTensor,
    high: QuantizedTensor | None,
    high_valid: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    *,
    policy: PrecisionPolicy,
    group_size: int | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    step: int | torch.Tensor = 0,
    row_signal: torch.Tensor | None = None,
    return_gate: bool = False,
    inplace: bool = False,
    block_rows: int | None = None,
    num_warps: int = 4,
) -> StateUpdate:
    """One fused decode step on a stored state; same arguments and result as `state_update_reference`.

    ``step`` may be a device int64 tensor (one element) so that a captured CUDA graph advances the noise
    of stochastic rounding by incrementing it. ``inplace`` writes the new copies into ``low``/``high``
    (each program reads its rows before writing them); ``high_valid`` is always a new tensor, because a
    Mamba2 head spans several programs that must all see its old flag. ``block_rows`` / ``num_warps`` set
    the launch: channels (Mamba) or head rows (Mamba2) per program, default tiles of about 2048 values.
    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    reason = unsupported_reason(policy, low, high, A, z, group_size)
    if reason is not None:
        raise NotImplementedError(reason)
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("state_update runs on CUDA tensors (or under TRITON_INTERPRET=1); "
                           "use gsq_hf.kernels.state_update_reference on CPU")
    mamba2 = low.data.dim() == 4
    shape = low.shape
    batch, units, n = shape[0], shape[1], shape[-1]
    group = group_size or n
    device = x.device
    code, threshold = policy.kernel_rule()
    high_fmt = policy.high if policy.high is not None else policy.low

    y = torch.empty(x.shape, dtype=x.dtype, device=device)
    out_low = low if inplace else empty_storage(policy.low, shape, group, device)
    out_high = out_valid = None
    if code != "static":
        out_high = high if inplace and high is not None else empty_storage(policy.high, shape, group, device)
        out_valid = torch.empty(batch, units, dtype=torch.bool, device=device)
    gate = torch.empty(batch, units, device=device) if return_gate else None
    row_high = None
    if code == "row":
        rows = {} if row_signal is None else {name: row_signal for name in policy.signals}
        row_high = policy.choose(Signals((batch, 1), device, rows))[:, 0].contiguous()
    read_high = high is not None and high_valid is not None

    unused = y  # stands in for the pointers a specialization never dereferences
    x, stride_x = _batch_rows(x)
    dt, stride_dt = _batch_rows(dt)
    B, stride_B = _batch_rows(B)
    C, stride_C = _batch_rows(C)
    step_in_memory = isinstance(step, torch.Tensor)
    pointers = [*_storage_pointers(low, unused), *_storage_pointers(high if read_high else None, unused),
                high_valid if read_high else unused,
                *_storage_pointers(out_low, unused), *_storage_pointers(out_high, unused),
                out_valid if out_valid is not None else unused,
                x, dt, dt_bias if dt_bias is not None else unused, A.contiguous(), B, C,
                D if D is not None else unused]
    constants = dict(N=n, GROUP=group, **_format_constants("LOW", policy.low), **_format_constants("HIGH", high_fmt),
                     POLICY=code, READ_HIGH=read_high, STOCHASTIC=rounding == "stochastic",
                     STEP_IN_MEMORY=step_in_memory, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
                     HAS_D=D is not None, WRITE_GATE=return_gate, num_warps=num_warps)
    scalars = [dt_limit[0], dt_limit[1], threshold, seed, step]
    outputs = [y, gate if gate is not None else unused, row_high if row_high is not None else unused]
    if mamba2:
        head_dim = shape[2]
        block = block_rows or default_block(head_dim, n)
        grid = (triton.cdiv(head_dim, block), units, batch)
        _mamba2_kernel[grid](*pointers, *outputs, head_dim, units // B.shape[1], stride_x, stride_dt, stride_B,
                             stride_C, y.stride(0), *scalars, BLOCK=block, **constants)
    else:
        z_rows, stride_z = _batch_rows(z) if z is not None else (unused, 0)
        block = block_rows or default_block(units, n)
        grid = (triton.cdiv(units, block), batch)
        _mamba_kernel[grid](*pointers, z_rows, *outputs, units, stride_x, stride_dt, stride_B, stride_C, stride_z,
                            y.stride(0), *scalars, BLOCK=block, HAS_Z=z is not None, **constants)
    return StateUpdate(y, out_low, out_high, out_valid, gate)

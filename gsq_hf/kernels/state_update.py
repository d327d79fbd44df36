"""Fused decode-step update of a quantized SSM state: one Triton pass per step.

Why: on a GPU the state update of a decode step is memory-bound, and an unfused quantized state (dequantize
→ fp32 update → quantize, three passes plus temporaries) runs 2–9× *slower* than the fp32 kernel it was
meant to beat (``../shared/MEASUREMENTS.md``). Here every stored byte is read once and written once: a
program loads its tile of the state in the stored format (the high copy where valid, else the low copy),
updates it in fp32 registers, computes the gate, picks each unit's format from the policy, re-quantizes
and stores the low copy (and the high copy + valid flag of the units marked high), and writes ``y``.

Kernels (row = one (batch, unit[, p]) vector of ``N`` = d_state values; groups of ``group_size`` along N
share an absmax scale, laid out as `gsq_hf.formats` stores them):

* `_mamba_kernel`: state (batch, D, N); grid (D / BLOCK, batch); ``exp(Δ·A)`` per (channel, n) as the
  model defines it; gate ``1 − mean_n exp(Δ·A_n)`` per channel; decisions per channel inside the tile.
  A decay per n does not commute with a rotation along N: rotated copies are unrotated after loading
  and rotated before storing (a log2(N)-stage butterfly per row each way).
* `_mamba2_kernel`: state (batch, H, P, N); grid (P / BLOCK, H, batch); one ``exp(Δ·A)`` per program, i.e.
  per head, never per element (a per-element exp made an earlier int8 kernel compute-bound); gate
  ``1 − exp(Δ·A)``; one decision per head. One decay per head commutes with the rotation, so the update
  runs in the low copy's basis: a rotated state is updated as stored and only B and C (N values per
  program) are rotated; only a high copy stored in the other basis is converted.

Every `gsq_hf.formats` code grid is handled (packed as formats packs it, `_triton_formats`), with any
group scale (fp32, fp16, e4m3, e4m3up, log8, e8m0), rotated or not (`KERNEL_FORMATS`). **e4m3 (and log8)
scales** are stored relative to a second-level fp32 scale per batch row, the row's largest group scale / 448
(log8: the row's largest group scale), so no group can be stored
before the whole batch row (all units: D·N values, or H·P·N) has been updated, and a batch row spans many
programs. A step with an e4m3 copy therefore launches the same kernel twice: a **pre-pass**
(``ROW_MAX_PASS``) computes the fresh state and folds each tile's largest finite group absmax into a
(batch, 2) buffer with ``atomic_max``, storing nothing; the main pass recomputes the state (the same jitted
arithmetic) and derives each batch row's scale from that maximum. Chosen over one program per batch row
(a loop over all units: parallelism = batch, hopeless at batch 1) and over a grid-wide barrier (Triton has
none, and programs are not all resident): the pre-pass costs a launch and one more read of the stored
state and the step's inputs (at 4.5 stored bits, state traffic of 13.5 bits per value instead of 9, against
fp32's 64; not yet timed on a GPU). The new row scale goes to a fresh tensor (every program of the row
reads the old one), copied into a copy updated in place after the launch.

Formats are compile-time constants; rounding is round-half-even, stochastic (Philox keyed by ``seed``,
counted by (element, ``step``, stream): steps differ, low and high copies draw independently) or
quasi-random (`gsq_hf.formats.QuasiRandom`'s thresholds, bit for bit: the twin tests compare codes). Float
formats are rounded onto their grid in fp32 arithmetic, so the final cast is exact on every backend (the
Triton interpreter truncates fp32→bf16). The same arithmetic is what `state_update_reference` does with
`gsq_hf.formats`; ``tests/kernels`` compares the two.

The conv before the step (``conv=``, Mamba2): x, B and C are then computed in the kernel from the stored conv
windows (`gsq_hf.kernels.conv_step.conv_channels`), and the new window returned; docs/design.md says why
Mamba-1 launches its conv on its own instead.

Dispatch: `gsq_hf.step.decode_step` calls `state_update` for a decode step where `gsq_hf.step.kernel_reason`
is None (the rules: there and in docs/design.md); it stores the returned copies (``inplace=False``:
`LayerStorage` stays immutable, so checkpoints stay references), takes the write statistics from
``high_valid``, steps the noise with the layer's write counter, and redoes a step whose output is NaN/Inf on
the torch path. Timings on an H200: ``docs/performance.md``
(the composed formats have not been timed on a GPU yet: ``scripts/bench_state_update.py`` has their rows).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..formats import FORMATS, QuantizedTensor, _hadamard, noble_steps
from ..policies import PrecisionPolicy, Signals
from ._triton_formats import add_row_max, format_constants, load_state, to_basis, write_copy
from .conv_step import conv_channels, conv_constants, conv_pointers
from .reference import (
    ConvStep,
    StateUpdate,
    check_conv,
    check_scale_hold,
    conv_unsupported_reason,
    empty_storage,
    unsupported_reason,
    xbc_groups,
)

__all__ = ["state_update"]

ROUNDING_NOISE = {"nearest": 0, "stochastic": 1, "quasirandom": 2}  # the kernels' NOISE: thresholds' source

# -- step helpers --------------------------------------------------------------------------------------
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
def _read(low_ptr, low_scale_ptr, low_row_ptr, high_ptr, high_scale_ptr, high_row_ptr, valid_ptr, signs_ptr, b, units,
          rows, mask, LOW: tl.constexpr, LOW_BITS: tl.constexpr, LOW_MIDRISE: tl.constexpr, LOW_SCALE: tl.constexpr,
          LOW_ROTATED: tl.constexpr, HIGH: tl.constexpr, HIGH_BITS: tl.constexpr, HIGH_MIDRISE: tl.constexpr,
          HIGH_SCALE: tl.constexpr, HIGH_ROTATED: tl.constexpr, READ_HIGH: tl.constexpr, BASIS_ROTATED: tl.constexpr,
          N: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """The state a reader sees (ROWS, N), in the kernel's basis: a row loads only its high copy (where its unit's
    flag is set) or its low copy.

    ``units`` (ROWS,) is the policy unit of each row (the row itself for Mamba, its head for Mamba2).
    """
    low_mask = mask
    if READ_HIGH:
        valid = tl.load(valid_ptr + units, mask=mask, other=0) != 0  # (ROWS,)
        low_mask = mask & ~valid
    low = load_state(low_ptr, low_scale_ptr, low_row_ptr, b, rows, low_mask, LOW, LOW_BITS, LOW_MIDRISE, LOW_SCALE,
                     N, GROUP, ROWS)
    low = to_basis(low, signs_ptr, LOW_ROTATED, BASIS_ROTATED, ROWS, N)
    if READ_HIGH:
        high = load_state(high_ptr, high_scale_ptr, high_row_ptr, b, rows, mask & valid, HIGH, HIGH_BITS,
                          HIGH_MIDRISE, HIGH_SCALE, N, GROUP, ROWS)
        return tl.where(valid[:, None], to_basis(high, signs_ptr, HIGH_ROTATED, BASIS_ROTATED, ROWS, N), low)
    else:
        return low


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
    low_ptr, low_scale_ptr, low_row_ptr, high_ptr, high_scale_ptr, high_row_ptr, valid_ptr,  # stored state, read
    out_low_ptr, out_low_scale_ptr, out_low_row_ptr, out_high_ptr, out_high_scale_ptr, out_high_row_ptr,
    out_valid_ptr,  # stored state, written
    row_max_ptr, signs_ptr, weyl_ptr,  # (batch, 2) e4m3 row maxima of the pre-pass; rotation signs; noble steps
    x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, gate_ptr, row_high_ptr,
    dim, stride_x, stride_dt, stride_B, stride_C, stride_z, stride_y,  # batch strides; inner dims contiguous
    dt_min, dt_max, threshold, seed, step, hold,  # hold: GSQConfig.scale_hold (HOLD)
    N: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
    LOW: tl.constexpr, LOW_BITS: tl.constexpr, LOW_MIDRISE: tl.constexpr, LOW_SCALE: tl.constexpr,
    LOW_MAX: tl.constexpr, LOW_MBITS: tl.constexpr, LOW_MIN_EXP: tl.constexpr, LOW_ROTATED: tl.constexpr,
    HIGH: tl.constexpr, HIGH_BITS: tl.constexpr, HIGH_MIDRISE: tl.constexpr, HIGH_SCALE: tl.constexpr,
    HIGH_MAX: tl.constexpr, HIGH_MBITS: tl.constexpr, HIGH_MIN_EXP: tl.constexpr, HIGH_ROTATED: tl.constexpr,
    POLICY: tl.constexpr, READ_HIGH: tl.constexpr, ROW_MAX_PASS: tl.constexpr, NOISE: tl.constexpr,
    STEP_IN_MEMORY: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, WRITE_GATE: tl.constexpr, HOLD: tl.constexpr,
):
    """Mamba: state (batch, D, N); one program = BLOCK channels (= units = rows) of one batch row.

    The update runs in the unrotated basis (the decay differs per n): rotated copies are unrotated after
    loading and rotated before storing."""
    b = tl.program_id(1)
    d = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) channels
    mask = d < dim
    row0 = b.to(tl.int64) * dim  # the batch row's first row
    rows = row0 + d  # (BLOCK,)
    n = tl.arange(0, N)
    if STEP_IN_MEMORY:
        step = tl.load(step)

    x = tl.load(x_ptr + b * stride_x + d, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    dt = _delta(dt_ptr, dt_bias_ptr, b * stride_dt + d, d, mask, dt_min, dt_max, HAS_DT_BIAS, DT_SOFTPLUS)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask[:, None], other=0.0).to(tl.float32)  # (BLOCK, N)
    B = tl.load(B_ptr + b * stride_B + n).to(tl.float32)  # (N,)
    dA = tl.exp(dt[:, None] * A)  # (BLOCK, N): A differs per (channel, n)

    state = _read(low_ptr, low_scale_ptr, low_row_ptr, high_ptr, high_scale_ptr, high_row_ptr, valid_ptr, signs_ptr,
                  b, rows, rows, mask, LOW, LOW_BITS, LOW_MIDRISE, LOW_SCALE, LOW_ROTATED, HIGH, HIGH_BITS,
                  HIGH_MIDRISE, HIGH_SCALE, HIGH_ROTATED, READ_HIGH, False, N, GROUP, BLOCK)
    h = dA * state + (dt[:, None] * B[None, :]) * x[:, None]  # (BLOCK, N)

    if ROW_MAX_PASS:
        add_row_max(h, row_max_ptr, signs_ptr, b, mask, 0, LOW_SCALE, LOW_ROTATED, False, N, GROUP, BLOCK)
        if POLICY != "static":
            add_row_max(h, row_max_ptr, signs_ptr, b, mask, 1, HIGH_SCALE, HIGH_ROTATED, False, N, GROUP, BLOCK)
    else:
        C = tl.load(C_ptr + b * stride_C + n).to(tl.float32)  # (N,)
        y = tl.sum(h * C[None, :], axis=1)  # (BLOCK,)
        if HAS_D:
            y += x * tl.load(D_ptr + d, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + b * stride_z + d, mask=mask, other=0.0).to(tl.float32)
            y *= z / (1.0 + tl.exp(-z))  # silu
        tl.store(y_ptr + b * stride_y + d, y, mask=mask)

        first = tl.program_id(0) == 0  # writes the batch row's e4m3 row scales
        write_copy(h, out_low_ptr, out_low_scale_ptr, out_low_row_ptr, row_max_ptr, signs_ptr, b, rows, mask, first,
                   seed, step, weyl_ptr, row0, 0, LOW, LOW_BITS, LOW_MIDRISE, LOW_SCALE, LOW_MAX, LOW_MBITS,
                   LOW_MIN_EXP, LOW_ROTATED, False, NOISE, N, GROUP, BLOCK, low_scale_ptr, low_row_ptr, hold, HOLD)
        gate = 1.0 - tl.sum(dA, axis=1) / N  # (BLOCK,)
        if POLICY != "static":
            high = _choose(gate, row_high_ptr, b, threshold, POLICY)  # (BLOCK,)
            write_copy(h, out_high_ptr, out_high_scale_ptr, out_high_row_ptr, row_max_ptr, signs_ptr, b, rows,
                       mask & high, first, seed, step, weyl_ptr, row0, 1, HIGH, HIGH_BITS, HIGH_MIDRISE, HIGH_SCALE,
                       HIGH_MAX, HIGH_MBITS, HIGH_MIN_EXP, HIGH_ROTATED, False, NOISE, N, GROUP, BLOCK,
                       low_scale_ptr, low_row_ptr, hold, False)
            tl.store(out_valid_ptr + rows, high, mask=mask)
        if WRITE_GATE:
            tl.store(gate_ptr + rows, gate, mask=mask)


@triton.jit
def _mamba2_kernel(
    low_ptr, low_scale_ptr, low_row_ptr, high_ptr, high_scale_ptr, high_row_ptr, valid_ptr,  # stored state, read
    out_low_ptr, out_low_scale_ptr, out_low_row_ptr, out_high_ptr, out_high_scale_ptr, out_high_row_ptr,
    out_valid_ptr,  # stored state, written
    row_max_ptr, signs_ptr, weyl_ptr,  # (batch, 2) e4m3 row maxima of the pre-pass; rotation signs; noble steps
    x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, gate_ptr, row_high_ptr,
    win_ptr, win_scale_ptr, out_win_ptr, out_win_scale_ptr, u_ptr, conv_w_ptr, conv_b_ptr,  # the conv (HAS_CONV)
    head_dim, heads_per_group, stride_x, stride_dt, stride_B, stride_C, stride_y, stride_u,  # batch strides
    dt_min, dt_max, threshold, seed, step, hold,  # hold: GSQConfig.scale_hold (HOLD)
    N: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
    LOW: tl.constexpr, LOW_BITS: tl.constexpr, LOW_MIDRISE: tl.constexpr, LOW_SCALE: tl.constexpr,
    LOW_MAX: tl.constexpr, LOW_MBITS: tl.constexpr, LOW_MIN_EXP: tl.constexpr, LOW_ROTATED: tl.constexpr,
    HIGH: tl.constexpr, HIGH_BITS: tl.constexpr, HIGH_MIDRISE: tl.constexpr, HIGH_SCALE: tl.constexpr,
    HIGH_MAX: tl.constexpr, HIGH_MBITS: tl.constexpr, HIGH_MIN_EXP: tl.constexpr, HIGH_ROTATED: tl.constexpr,
    POLICY: tl.constexpr, READ_HIGH: tl.constexpr, ROW_MAX_PASS: tl.constexpr, NOISE: tl.constexpr,
    STEP_IN_MEMORY: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
    WRITE_GATE: tl.constexpr, HOLD: tl.constexpr, HAS_CONV: tl.constexpr,
    CONV: tl.constexpr, CONV_BITS: tl.constexpr, CONV_MIDRISE: tl.constexpr, CONV_SCALE: tl.constexpr,
    CONV_MAX: tl.constexpr, CONV_MBITS: tl.constexpr, CONV_MIN_EXP: tl.constexpr, CONV_ROTATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, WDT: tl.constexpr, K: tl.constexpr,
):
    """Mamba2: state (batch, H, P, N); one program = BLOCK rows p of one head (= unit) of one batch row.

    The update runs in the low copy's basis: one decay per head commutes with a rotation along N, so a
    rotated state is updated as stored and the program rotates B and C (N values) instead of its tile.

    HAS_CONV: x, B and C are this token's conv outputs (xBC = [x | B | C] channels), computed here from the
    stored windows (`conv_channels`): x for the program's rows, B and C of its group (every program of the group
    recomputes those 2N channels: there is no grid-wide barrier to share them). Each window is stored once, by
    the main pass: x rows by their program, B and C rows by the group's first program, into a new tensor (the
    other programs of the group read the old one)."""
    b = tl.program_id(2)
    head = tl.program_id(1)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = p < head_dim
    unit = b.to(tl.int64) * tl.num_programs(1) + head
    units = tl.zeros((BLOCK,), tl.int64) + unit  # (BLOCK,): every row of the tile belongs to this head
    rows = unit * head_dim + p  # (BLOCK,)
    row0 = b.to(tl.int64) * tl.num_programs(1) * head_dim  # the batch row's first row
    n = tl.arange(0, N)
    group = head // heads_per_group
    if STEP_IN_MEMORY:
        step = tl.load(step)

    dt = _delta(dt_ptr, dt_bias_ptr, b * stride_dt + head, head, True, dt_min, dt_max, HAS_DT_BIAS, DT_SOFTPLUS)
    dA = tl.exp(dt * tl.load(A_ptr + head).to(tl.float32))  # scalar: one exp per head
    if HAS_CONV:
        d_inner = tl.num_programs(1) * head_dim
        conv_dim = d_inner + 2 * (tl.num_programs(1) // heads_per_group) * N
        x = conv_channels(win_ptr, win_scale_ptr, out_win_ptr, out_win_scale_ptr, u_ptr, conv_w_ptr, conv_b_ptr, b,
                          head * head_dim + p, mask, True, conv_dim, stride_u, not ROW_MAX_PASS, CONV, CONV_BITS,
                          CONV_MIDRISE, CONV_SCALE, CONV_MAX, CONV_MBITS, CONV_MIN_EXP, HAS_BIAS, ACT, WDT, K, BLOCK)
        writes_bc = (tl.program_id(0) == 0) & (head % heads_per_group == 0)  # the group's first program
        B = conv_channels(win_ptr, win_scale_ptr, out_win_ptr, out_win_scale_ptr, u_ptr, conv_w_ptr, conv_b_ptr, b,
                          d_inner + group * N + n, n < N, writes_bc, conv_dim, stride_u, not ROW_MAX_PASS, CONV,
                          CONV_BITS, CONV_MIDRISE, CONV_SCALE, CONV_MAX, CONV_MBITS, CONV_MIN_EXP, HAS_BIAS, ACT, WDT,
                          K, N)[None, :]  # (1, N)
    else:
        x = tl.load(x_ptr + b * stride_x + head * head_dim + p, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        B = tl.load(B_ptr + b * stride_B + group * N + n).to(tl.float32)[None, :]  # (1, N)
    B = to_basis(B, signs_ptr, False, LOW_ROTATED, 1, N)

    state = _read(low_ptr, low_scale_ptr, low_row_ptr, high_ptr, high_scale_ptr, high_row_ptr, valid_ptr, signs_ptr,
                  b, units, rows, mask, LOW, LOW_BITS, LOW_MIDRISE, LOW_SCALE, LOW_ROTATED, HIGH, HIGH_BITS,
                  HIGH_MIDRISE, HIGH_SCALE, HIGH_ROTATED, READ_HIGH, LOW_ROTATED, N, GROUP, BLOCK)
    h = dA * state + (dt * x)[:, None] * B  # (BLOCK, N)

    if ROW_MAX_PASS:
        add_row_max(h, row_max_ptr, signs_ptr, b, mask, 0, LOW_SCALE, LOW_ROTATED, LOW_ROTATED, N, GROUP, BLOCK)
        if POLICY != "static":
            add_row_max(h, row_max_ptr, signs_ptr, b, mask, 1, HIGH_SCALE, HIGH_ROTATED, LOW_ROTATED, N, GROUP,
                        BLOCK)
    else:
        if HAS_CONV:
            C = conv_channels(win_ptr, win_scale_ptr, out_win_ptr, out_win_scale_ptr, u_ptr, conv_w_ptr, conv_b_ptr,
                              b, conv_dim - (tl.num_programs(1) // heads_per_group - group) * N + n, n < N, writes_bc,
                              conv_dim, stride_u, True, CONV, CONV_BITS, CONV_MIDRISE, CONV_SCALE, CONV_MAX,
                              CONV_MBITS, CONV_MIN_EXP, HAS_BIAS, ACT, WDT, K, N)[None, :]  # (1, N)
        else:
            C = tl.load(C_ptr + b * stride_C + group * N + n).to(tl.float32)[None, :]  # (1, N)
        C = to_basis(C, signs_ptr, False, LOW_ROTATED, 1, N)  # h·C is the same in either basis
        y = tl.sum(h * C, axis=1)  # (BLOCK,)
        if HAS_D:
            y += x * tl.load(D_ptr + head).to(tl.float32)
        tl.store(y_ptr + b * stride_y + head * head_dim + p, y, mask=mask)

        first = (tl.program_id(0) == 0) & (head == 0)  # writes the batch row's e4m3 row scales
        write_copy(h, out_low_ptr, out_low_scale_ptr, out_low_row_ptr, row_max_ptr, signs_ptr, b, rows, mask, first,
                   seed, step, weyl_ptr, row0, 0, LOW, LOW_BITS, LOW_MIDRISE, LOW_SCALE, LOW_MAX, LOW_MBITS,
                   LOW_MIN_EXP, LOW_ROTATED, LOW_ROTATED, NOISE, N, GROUP, BLOCK, low_scale_ptr, low_row_ptr, hold,
                   HOLD)
        gate = tl.full((BLOCK,), 1.0, tl.float32) - dA  # (BLOCK,), one value
        head_out = mask & (p == 0)  # the per-head outputs are written once
        if POLICY != "static":
            high = _choose(gate, row_high_ptr, b, threshold, POLICY)  # (BLOCK,), one value
            write_copy(h, out_high_ptr, out_high_scale_ptr, out_high_row_ptr, row_max_ptr, signs_ptr, b, rows,
                       mask & high, first, seed, step, weyl_ptr, row0, 1, HIGH, HIGH_BITS, HIGH_MIDRISE, HIGH_SCALE,
                       HIGH_MAX, HIGH_MBITS, HIGH_MIN_EXP, HIGH_ROTATED, LOW_ROTATED, NOISE, N, GROUP, BLOCK,
                       low_scale_ptr, low_row_ptr, hold, False)
            tl.store(out_valid_ptr + units, high, mask=head_out)
        if WRITE_GATE:
            tl.store(gate_ptr + units, gate, mask=head_out)


# -- the wrapper ---------------------------------------------------------------------------------------


def _batch_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` with contiguous dims after the batch dim (copied only if not), and its batch stride."""
    if not t[0].is_contiguous():
        t = t.contiguous()
    return t, t.stride(0)


def _storage_pointers(q: QuantizedTensor | None, fallback: torch.Tensor, written: bool = False) -> list[torch.Tensor]:
    """[data, scale, row scale] of a stored copy; ``fallback`` stands in for what the kernel never touches.

    A copy the kernel only reads is made contiguous (the CPU torch path stores Mamba-1 states state-dim-outer:
    copied once, the kernel's own outputs are contiguous); one it writes in place must already be.
    """
    if q is None:
        return [fallback] * 3
    if written and not all(t.is_contiguous() for t in (q.data, q.scale) if t is not None):
        raise ValueError("inplace=True needs contiguous stored state tensors; pass inplace=False (a new copy)")
    return [t.contiguous() if t is not None else fallback for t in (q.data, q.scale, q.row_scale)]


@functools.cache
def _rotation_signs(n: int, device: torch.device) -> torch.Tensor:
    """The first column of `gsq_hf.formats`' rotation matrix (its signs, ±1/√n), which the kernel expands."""
    return _hadamard(n, device)[:, 0].contiguous()


_NO_CONV = dict(HAS_CONV=False, **format_constants("CONV", FORMATS["fp32"]), HAS_BIAS=False, ACT="fp32", WDT="fp32",
                K=2)  # a Mamba2 step given x, B and C: the conv constants of a specialization that has none


def default_block(length: int, d_state: int) -> int:
    """Rows per program along a dim of ``length`` (channels D, or head_dim P): tiles of about 2048 values.

    The bench script sweeps others (``block_rows``).
    """
    return min(triton.next_power_of_2(length), max(1, 2048 // d_state))


def state_update(
    low: QuantizedTensor,
    high: QuantizedTensor | None,
    high_valid: torch.Tensor | None,
    x: torch.Tensor | None,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor | None,
    C: torch.Tensor | None,
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
    conv: ConvStep | None = None,
    scale_hold: float = 0.0,
    block_rows: int | None = None,
    num_warps: int = 4,
) -> StateUpdate:
    """One fused decode step on a stored state; same arguments and result as `state_update_reference`.

    ``step`` may be a device int64 tensor (one element) so that a captured CUDA graph advances the noise
    of stochastic rounding by incrementing it. ``inplace`` writes the new copies into ``low``/``high``
    (each program reads its rows before writing them); ``high_valid`` is always a new tensor, because a
    Mamba2 head spans several programs that must all see its old flag. ``block_rows`` / ``num_warps`` set
    the launch: channels (Mamba) or head rows (Mamba2) per program, default tiles of about 2048 values.
    ``conv`` (Mamba2; x, B, C None): the conv runs in the same launch (`_mamba2_kernel`'s HAS_CONV) and its new
    window, a new tensor whatever ``inplace`` says, is returned as ``conv``.
    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    reason = unsupported_reason(policy, low, high, A, z, group_size)
    if reason is None and conv is not None:
        check_conv(conv, low, x, B, C)
        reason = conv_unsupported_reason(conv, "nearest")
    if reason is not None:
        raise NotImplementedError(reason)
    check_scale_hold(scale_hold)
    if conv is not None:
        x = conv.u  # where the conv's output goes: the same device and dtype
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

    y = torch.empty(shape[:-1] if conv is not None else x.shape, dtype=x.dtype, device=device)
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
    written = [f for f in (policy.low, policy.high if code != "static" else None) if f is not None]

    unused = y  # stands in for the pointers a specialization never dereferences
    # e4m3 row scales: every program of a batch row reads the old one, so the new one goes to a fresh tensor,
    # copied into the stored copy after the launch when that copy is updated in place
    in_place_rows = [q for q in (out_low, out_high) if q is not None and q.row_scale is not None
                     and (q is low or q is high)]
    new_rows = {id(q): torch.empty_like(q.row_scale) for q in in_place_rows}
    out_pointers = []
    for q in (out_low, out_high):
        data, scale, row = _storage_pointers(q, unused, written=True)
        out_pointers += [data, scale, new_rows.get(id(q), row)]
    row_max = torch.zeros(batch, 2, device=device) if any(f.row_bytes for f in written) else unused
    rotated = any(f.rotation is not None for f in (*written, *(q.fmt for q in (low, high) if q is not None)))
    signs = _rotation_signs(n, device) if rotated else unused

    dt, stride_dt = _batch_rows(dt)
    if conv is None:
        (x, stride_x), (B, stride_B), (C, stride_C) = _batch_rows(x), _batch_rows(B), _batch_rows(C)
        groups = B.shape[1] if mamba2 else 1
    else:  # the kernel makes them from the conv
        (x, stride_x), (B, stride_B), (C, stride_C) = [(unused, 0)] * 3
        groups = xbc_groups(conv.u.shape[1], *shape[1:])
    step_in_memory = isinstance(step, torch.Tensor)
    pointers = [*_storage_pointers(low, unused), *_storage_pointers(high if read_high else None, unused),
                high_valid if read_high else unused, *out_pointers,
                out_valid if out_valid is not None else unused, row_max, signs,
                noble_steps(device) if rounding == "quasirandom" else unused,
                x, dt, dt_bias if dt_bias is not None else unused, A.contiguous(), B, C,
                D if D is not None else unused]
    constants = dict(N=n, GROUP=group, **format_constants("LOW", policy.low), **format_constants("HIGH", high_fmt),
                     POLICY=code, READ_HIGH=read_high, NOISE=ROUNDING_NOISE[rounding],
                     STEP_IN_MEMORY=step_in_memory, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
                     HAS_D=D is not None, WRITE_GATE=return_gate, HOLD=scale_hold > 0 and policy.low.scaled,
                     num_warps=num_warps)
    scalars = [dt_limit[0], dt_limit[1], threshold, seed, step, float(scale_hold)]
    outputs = [y, gate if gate is not None else unused, row_high if row_high is not None else unused]
    new_window = None
    if mamba2:
        head_dim = shape[2]
        block = block_rows or default_block(head_dim, n)
        grid = (triton.cdiv(head_dim, block), units, batch)
        conv_args, stride_u = [unused] * 7, 0
        if conv is not None:
            conv_args, new_window, stride_u = conv_pointers(conv, unused)
        kernel, args = _mamba2_kernel, [*pointers, *outputs, *conv_args, head_dim, units // groups, stride_x, stride_dt,
                                        stride_B, stride_C, y.stride(0), stride_u, *scalars]
        constants |= dict(HAS_CONV=True, **conv_constants(conv)) if conv is not None else _NO_CONV
    else:
        z_rows, stride_z = _batch_rows(z) if z is not None else (unused, 0)
        block = block_rows or default_block(units, n)
        grid = (triton.cdiv(units, block), batch)
        kernel, args = _mamba_kernel, [*pointers, z_rows, *outputs, units, stride_x, stride_dt, stride_B, stride_C,
                                       stride_z, y.stride(0), *scalars]
        constants["HAS_Z"] = z is not None
    if row_max is not unused:  # the e4m3 pre-pass: each batch row's largest group absmax of the fresh state
        kernel[grid](*args, BLOCK=block, ROW_MAX_PASS=True, **constants)
    kernel[grid](*args, BLOCK=block, ROW_MAX_PASS=False, **constants)
    for q in in_place_rows:
        q.row_scale.copy_(new_rows[id(q)])
    return StateUpdate(y, out_low, out_high, out_valid, gate, conv=new_window)

"""Triton device functions that read and write one tile of a stored state in any `gsq_hf.formats` format.

A tile is ``ROWS`` state rows of ``N`` = d_state values. A stored copy is described by compile-time
constants (`format_constants` builds them from a `StateFormat`, under a prefix ``LOW`` / ``HIGH``):

    CODES    "int" (packed integer codes), "fp32" (lossless) or "float" (bf16 / fp16 / fp8 values)
    BITS     int code bits (2..8); MIDRISE: levels k + 0.5 instead of k
    SCALE    "" (unscaled), "fp32", "fp16", "e4m3" / "e4m3up" / "log8" (over an fp32 second-level scale per
             batch row; e4m3up rounded up; log8 a uint8 code k of 2**(-k/32)) or "e8m0" (a power-of-two exponent)
    MAX      the largest level; MBITS / MIN_EXP: the float format's mantissa bits / smallest exponent
    ROTATED  stored in the randomized Hadamard basis (``x @ M``, ``M = diag(signs) · H_N / √N``)

Integer codes are packed as `gsq_hf.formats` packs them: code i of a block of ``PER = 8 / gcd(BITS, 8)``
codes sits at bit ``i · BITS`` of the block's little-endian word of ``PER · BITS / 8`` bytes, offset by
``2**(BITS − 1)`` to unsigned (8-bit codes: one signed byte each). The word is assembled from one strided
byte load per byte of the block (3 for int3) and split into codes by log2(PER) halvings (join / split of
neighbours, no reductions), so every packing is handled by the same code.

The Hadamard rotation is a fast Walsh–Hadamard transform in log2(N) butterfly stages on the tile (Pease's
constant-geometry form: each stage pairs neighbours and writes sums to the first half, differences to the
second, which leaves Sylvester's order after the last stage): N·log2(N) adds per row instead of an N×N
product, for any power-of-two N. ``signs`` holds the first column of `gsq_hf.formats`' rotation matrix
(``±1/√N``), so the kernel uses the same signs and normalisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import _HOLD_SLACK, _LOG8_STEPS, _LOG8_ZERO, _ROW_HOLD, _ROW_SCALED, StateFormat

__all__ = ["format_constants"]

_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)  # the floor of a group scale, as in gsq_hf.formats
_SLACK = tl.constexpr(_HOLD_SLACK)  # held scales (GSQConfig.scale_hold), as in gsq_hf.formats
_ROW_KEEP = tl.constexpr(_ROW_HOLD)
_E4M3_MAX = tl.constexpr(448.0)
_LOG8_STEPS = tl.constexpr(float(_LOG8_STEPS))
_LOG8_ZERO = tl.constexpr(float(_LOG8_ZERO))
_FP16_MAX = tl.constexpr(65504.0)
_INF = tl.constexpr(float("inf"))


def format_constants(prefix: str, fmt: StateFormat) -> dict:
    """The compile-time constants that describe how a copy is stored (see the module docstring)."""
    codes = "int" if fmt.kind == "int" else "fp32" if fmt.storage_dtype == torch.float32 else "float"
    return {prefix: codes, f"{prefix}_BITS": fmt.bits, f"{prefix}_MIDRISE": fmt.midrise,
            f"{prefix}_SCALE": fmt.scale_dtype if fmt.scaled else "", f"{prefix}_MAX": float(fmt.max_code),
            f"{prefix}_MBITS": fmt.mantissa_bits, f"{prefix}_MIN_EXP": fmt.min_exponent,
            f"{prefix}_ROTATED": fmt.rotation is not None}


@triton.constexpr_function
def _row_scaled(scale):
    """Whether group scales of this dtype are stored over a batch row's second-level scale (at compile time)."""
    return scale in _ROW_SCALED


# -- rounding ------------------------------------------------------------------------------------------
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
def _e8m0_exponent(scale):
    """The int8 exponent of the power of two at or above ``scale`` (≥ 0), clamped to [-127, 127], as
    `gsq_hf.formats` takes it: from frexp, one less where the scale is a power of two, -127 for a zero scale
    (mid-rise codes have no zero level: a zero group then reads back ±2**-128, not ±0.5)."""
    bits = scale.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    normal = biased - 126 - (mantissa == 0).to(tl.int32)
    subnormal = tl.where(mantissa > 0x400000, -126, -127)  # below 2**-126: the power of two above is 2**-126 or less
    exponent = tl.where(biased == 0, tl.where(mantissa == 0, -127, subnormal), normal)
    return tl.minimum(tl.maximum(exponent, -127), 127)


@triton.jit
def _e8m0_value(exponent):
    """2**exponent in fp32 for an int32 exponent in [-127, 127] (2**-127 is subnormal: half of 2**-126)."""
    return _pow2(tl.maximum(exponent, -126)) * tl.where(exponent == -127, 0.5, 1.0)


@triton.jit
def mix32(x):
    """`gsq_hf.formats.mix32` on uint32 values (products wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * (x * 0 + 0x7FEB352D).to(tl.uint32)
    x = x ^ (x >> 15)
    x = x * (x * 0 + 0x846CA68B).to(tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def quasi_uniform(seed, step, weyl_ptr, row0, STREAM: tl.constexpr, rows, N: tl.constexpr):
    """`gsq_hf.formats.QuasiRandom` thresholds (ROWS, N), bit for bit: ``frac(offset + step · α)`` in 24 bits,
    offset a hash of the element's row-major index within its batch row ((rows − row0) · N + n, ``row0`` the
    batch row's first row), ``seed`` and ``STREAM``; α the entry of the 256 noble steps at ``weyl_ptr``
    (`gsq_hf.formats.noble_steps`) that the offset's salted hash picks."""
    index = ((rows - row0)[:, None] * N + tl.arange(0, N)[None, :]).to(tl.int64)
    zero = index * 0  # seed and step enter through tensors: Triton may pass a scalar argument as a constant
    key = mix32((zero + seed + STREAM * 0x9E3779B9).to(tl.uint32))  # casts to uint32 keep the low 32 bits
    offset = mix32(index.to(tl.uint32) + key)
    salt = (zero + 0x5BD1E995).to(tl.uint32)  # gsq_hf.formats._STEP_SALT
    alpha = tl.load(weyl_ptr + (mix32(offset ^ salt) & 255)).to(tl.uint32)
    bits = offset + (zero + step).to(tl.uint32) * alpha
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24


@triton.jit
def uniform(seed, step, weyl_ptr, row0, STREAM: tl.constexpr, rows, ROWS: tl.constexpr, N: tl.constexpr,
            NOISE: tl.constexpr):
    """Uniform (0, 1) thresholds (ROWS, N) for stochastic rounding: NOISE 1, Philox draws (counter = (element
    block, step, stream): independent across elements, steps and the low/high copies), 16 bits per threshold so
    that one call's 128 bits serve eight elements (N = 4: one call per four, 32 bits each); NOISE 2,
    quasi-random (`quasi_uniform`). A 16-bit threshold sits mid-bin, (k + 0.5) / 2**16: floor(v + u) then rounds up
    with a probability within 2**-17 of v's distance above its grid point (unbiased to that)."""
    if NOISE == 2:
        return quasi_uniform(seed, step, weyl_ptr, row0, STREAM, rows, N)
    PER_CALL: tl.constexpr = 4 if N == 4 else 8
    block = rows[:, None] * (N // PER_CALL) + tl.arange(0, N // PER_CALL)[None, :]  # (ROWS, N / PER_CALL) int64
    zero = block.to(tl.uint32) * 0
    r0, r1, r2, r3 = tl.philox(seed, block.to(tl.uint32), (block >> 32).to(tl.uint32), (zero + step).to(tl.uint32),
                               zero + STREAM)
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (ROWS, N * 4 // PER_CALL))
    if PER_CALL == 4:
        return tl.uint_to_uniform_float(words)
    halves = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (ROWS, N))
    return (halves.to(tl.float32) + 0.5) * 1.52587890625e-05  # 2**-16


# -- rotation ------------------------------------------------------------------------------------------
@triton.jit
def _hadamard(x, signs_ptr, INVERSE: tl.constexpr, ROWS: tl.constexpr, N: tl.constexpr):
    """``x @ M`` (or ``x @ Mᵀ`` with INVERSE) for each row of ``x`` (ROWS, N), M as in `gsq_hf.formats`.

    M = diag(s) · H with s = ``signs`` (±1/√N) and H Sylvester's ±1 matrix (symmetric), so x @ M = (x ⊙ s) @ H
    and x @ Mᵀ = (x @ H) ⊙ s.
    """
    signs = tl.load(signs_ptr + tl.arange(0, N))[None, :]
    if not INVERSE:
        x = x * signs
    for _ in tl.static_range(N.bit_length() - 1):
        a, b = tl.split(tl.reshape(x, (ROWS, N // 2, 2)))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (ROWS, N))
    if INVERSE:
        x = x * signs
    return x


@triton.jit
def to_basis(x, signs_ptr, FROM_ROTATED: tl.constexpr, TO_ROTATED: tl.constexpr, ROWS: tl.constexpr,
             N: tl.constexpr):
    """Rows ``x`` (ROWS, N) given in one basis (rotated or not), in the other one (no-op when they agree)."""
    if FROM_ROTATED == TO_ROTATED:
        return x
    else:
        return _hadamard(x, signs_ptr, FROM_ROTATED, ROWS, N)


# -- scales --------------------------------------------------------------------------------------------
@triton.jit
def group_absmax(h, ROWS: tl.constexpr, N: tl.constexpr, GROUP: tl.constexpr):
    """|h| maximum of each group (ROWS, N / GROUP)."""
    return tl.max(tl.abs(tl.reshape(h, (ROWS, N // GROUP, GROUP))), axis=2)


@triton.jit
def finite_max(absmax, mask):
    """The largest finite value of ``absmax`` (ROWS, groups) over the rows in ``mask`` (0 if none): a batch row's
    contribution to its e4m3 second-level scale (a non-finite group must not spoil the others, as in formats)."""
    return tl.max(tl.max(tl.where(mask[:, None] & (absmax < _INF), absmax, 0.0), axis=1), axis=0)


@triton.jit
def row_scale(row_absmax, MAX: tl.constexpr, SCALE: tl.constexpr):
    """The second-level scale of a batch row from the largest group absmax of the row, as `gsq_hf.formats`
    computes it: (absmax / MAX) / 448 for e4m3, two IEEE divisions (max commutes with the monotone first one);
    absmax / MAX for log8."""
    if SCALE == "log8":
        return tl.div_rn(row_absmax, MAX)
    else:
        return tl.div_rn(tl.div_rn(row_absmax, MAX), _E4M3_MAX)


@triton.jit
def _log8_value(code):
    """The group scale over the row scale of log8 codes (fp32 holding 0..255): 2**(-k/32), 0 for 255. Within an
    ulp or two of `gsq_hf.formats`' table (the device's exp2)."""
    return tl.where(code == _LOG8_ZERO, 0.0, tl.exp2(code * (-1.0 / _LOG8_STEPS)))


# -- load and store a tile -----------------------------------------------------------------------------
@triton.jit
def _load_codes(data_ptr, rows, mask, BITS: tl.constexpr, N: tl.constexpr, ROWS: tl.constexpr):
    """Signed int codes (ROWS, N) as fp32, unpacked."""
    if BITS == 8:
        return tl.load(data_ptr + rows[:, None] * N + tl.arange(0, N)[None, :], mask=mask[:, None]).to(tl.float32)
    else:
        PER: tl.constexpr = 8 // (BITS & -BITS)  # codes per block
        NBYTES: tl.constexpr = PER * BITS // 8
        WORD: tl.constexpr = tl.int64 if PER * BITS > 32 else tl.int32
        block = rows[:, None] * (N // PER * NBYTES) + tl.arange(0, N // PER)[None, :] * NBYTES  # (ROWS, N/PER)
        word = tl.zeros((ROWS, N // PER), WORD)
        for k in tl.static_range(NBYTES):
            byte = tl.load(data_ptr + block + k, mask=mask[:, None], other=0)
            word |= byte.to(WORD) << (8 * k)
        for level in tl.static_range(PER.bit_length() - 1):  # halve the bits: (…, 2) pairs, low half first
            half = (BITS * PER) >> (level + 1)
            word = tl.join(word & ((1 << half) - 1), word >> half)
        return tl.reshape(word, (ROWS, N)).to(tl.float32) - (1 << (BITS - 1))


@triton.jit
def _store_codes(codes, data_ptr, rows, mask, BITS: tl.constexpr, N: tl.constexpr, ROWS: tl.constexpr):
    """Store signed int codes (ROWS, N, fp32 holding integers in range), packed."""
    if BITS == 8:
        tl.store(data_ptr + rows[:, None] * N + tl.arange(0, N)[None, :], codes.to(tl.int8), mask=mask[:, None])
    else:
        PER: tl.constexpr = 8 // (BITS & -BITS)
        NBYTES: tl.constexpr = PER * BITS // 8
        WORD: tl.constexpr = tl.int64 if PER * BITS > 32 else tl.int32
        word = (codes + (1 << (BITS - 1))).to(WORD)  # (ROWS, N) unsigned codes
        for level in tl.static_range(PER.bit_length() - 1):  # merge neighbours: code i lands at bit i * BITS
            low, high = tl.split(tl.reshape(word, (ROWS, N >> (level + 1), 2)))
            word = low | (high << (BITS << level))
        block = rows[:, None] * (N // PER * NBYTES) + tl.arange(0, N // PER)[None, :] * NBYTES
        for k in tl.static_range(NBYTES):
            tl.store(data_ptr + block + k, ((word >> (8 * k)) & 0xFF).to(tl.uint8), mask=mask[:, None])


@triton.jit
def _load_scales(scale_ptr, row, rows, mask, SCALE: tl.constexpr, N: tl.constexpr, GROUP: tl.constexpr):
    """The group scales (ROWS, N / GROUP) of ``rows``: (as stored, widened to fp32, e8m0's exponents to int32; the
    fp32 scales they stand for, e4m3's times the batch row's second-level scale ``row``). Masked-off rows move no
    bytes (their scales are never used)."""
    stored = tl.load(scale_ptr + rows[:, None] * (N // GROUP) + tl.arange(0, N // GROUP)[None, :], mask=mask[:, None])
    if SCALE == "e8m0":
        stored = stored.to(tl.int32)
        return stored, _e8m0_value(stored)
    else:
        stored = stored.to(tl.float32)
        if (SCALE == "e4m3") or (SCALE == "e4m3up"):
            return stored, stored * row
        elif SCALE == "log8":
            return stored, _log8_value(stored) * row
        else:
            return stored, stored


@triton.jit
def load_state(data_ptr, scale_ptr, row_scale_ptr, b, rows, mask, CODES: tl.constexpr, BITS: tl.constexpr,
               MIDRISE: tl.constexpr, SCALE: tl.constexpr, N: tl.constexpr, GROUP: tl.constexpr,
               ROWS: tl.constexpr):
    """The values (ROWS, N) of stored ``rows`` of batch row ``b``, in the copy's stored basis (rotated if it is);
    masked-off rows move no bytes (their values are never stored)."""
    if CODES == "int":
        values = _load_codes(data_ptr, rows, mask, BITS, N, ROWS)
        if MIDRISE:
            values += 0.5
    else:
        values = tl.load(data_ptr + rows[:, None] * N + tl.arange(0, N)[None, :], mask=mask[:, None]).to(tl.float32)
    if SCALE != "":
        row = 1.0
        if _row_scaled(SCALE):
            row = tl.load(row_scale_ptr + b)
        _, scale = _load_scales(scale_ptr, row, rows, mask, SCALE, N, GROUP)  # (ROWS, N / GROUP)
        values = tl.reshape(tl.reshape(values, (ROWS, N // GROUP, GROUP)) * scale[:, :, None], (ROWS, N))
    return values


@triton.jit
def store_state(h, data_ptr, scale_ptr, row_scale, rows, mask, seed, step, weyl_ptr, row0, STREAM: tl.constexpr,
                CODES: tl.constexpr, BITS: tl.constexpr, MIDRISE: tl.constexpr, SCALE: tl.constexpr,
                MAX: tl.constexpr, MBITS: tl.constexpr, MIN_EXP: tl.constexpr, NOISE: tl.constexpr,
                N: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, DIVIDE: tl.constexpr, old_scale_ptr,
                keep_row, hold, HOLD: tl.constexpr):
    """Quantize fp32 ``h`` (ROWS, N, already in the copy's basis) and store the ``rows`` where ``mask``.

    As `StateFormat.quantize`: scale = absmax / MAX per group, stored as the scale dtype rounds it (e4m3: of
    scale / ``row_scale``, the batch row's second-level scale; e8m0: the power of two at or above), values
    over max(stored scale, tiny), int codes rounded (stochastic: floor(v + u); mid-rise: floor(v),
    floor(v − 0.5 + u)) and clamped to the grid, floats clamped to ±MAX and rounded onto the format's grid.
    One difference, for speed: values are multiplied by the group's reciprocal scale (one IEEE division per
    group, not per element), which moves a code only where a value is within an ulp of a tie. With DIVIDE they
    are divided, as `gsq_hf.formats` does (the conv window: K values per scale, and a re-stored grid value sits
    exactly at a tie whenever its window's scale doubles).

    HOLD (`StateFormat._held_scale`): a group keeps its scale as stored at ``old_scale_ptr`` (this copy's
    previous write, read before this one overwrites it) where its new scale is at most that one (up to the
    slack) and at least ``hold`` of it; with e4m3, only in a batch row whose second-level scale was kept
    (``keep_row``: ``row_scale`` is then the previous one, so the stored e4m3 values keep their meaning).
    """
    u = uniform(seed, step, weyl_ptr, row0, STREAM, rows, ROWS, N, NOISE) if NOISE else 0.0
    v = h
    if SCALE != "":
        groups = tl.reshape(h, (ROWS, N // GROUP, GROUP))
        scale = tl.div_rn(group_absmax(h, ROWS, N, GROUP), MAX)  # (ROWS, N / GROUP)
        if HOLD:
            fresh = scale
            old_stored, old = _load_scales(old_scale_ptr, row_scale, rows, mask, SCALE, N, GROUP)
        if (SCALE == "e4m3") or (SCALE == "e4m3up"):
            ratio = tl.div_rn(scale, tl.maximum(row_scale, _TINY))
            # ≤ 448 but for an ulp (as in formats); the clamp also covers a pre-pass maximum an ulp below this
            # pass's, should the GPU compiler contract the two passes' arithmetic differently. e4m3up rounds up:
            # the stochastic rule with zero noise is the ceiling on the grid
            stored = _round_to_float_grid(tl.minimum(ratio, _E4M3_MAX), 0.0, 3, -6, SCALE == "e4m3up")
            scale = stored * row_scale
        elif SCALE == "log8":  # nearest in log space (the device's log2: a code may differ at a tie)
            ratio = tl.div_rn(scale, tl.maximum(row_scale, _TINY))
            code = tl.minimum(tl.maximum(_rne(tl.log2(tl.maximum(ratio, _TINY)) * -_LOG8_STEPS), 0.0), _LOG8_ZERO - 1.0)
            stored = tl.where(ratio > 0, code, _LOG8_ZERO)  # an all-zero group (or a NaN one): code 255
            scale = _log8_value(stored) * row_scale
        elif SCALE == "fp16":
            stored = _round_to_float_grid(tl.minimum(scale, _FP16_MAX), 0.0, 10, -14, False)
            scale = stored
        elif SCALE == "e8m0":
            stored = _e8m0_exponent(scale)
            scale = _e8m0_value(stored)
        else:
            stored = scale
        if HOLD:
            keep = (fresh <= old * _SLACK) & (fresh >= old * hold)
            if _row_scaled(SCALE):
                keep = tl.where(keep_row, keep, False)  # not `&`: the interpreter splats a scalar int1 as fp32
            stored = tl.where(keep, old_stored, stored)
            scale = tl.where(keep, old, scale)
        tl.store(scale_ptr + rows[:, None] * (N // GROUP) + tl.arange(0, N // GROUP)[None, :],
                 stored.to(scale_ptr.dtype.element_ty), mask=mask[:, None])
        if DIVIDE:
            v = tl.reshape(tl.div_rn(groups, tl.maximum(scale, _TINY)[:, :, None]), (ROWS, N))
        else:
            inverse = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), tl.maximum(scale, _TINY))  # (ROWS, N / GROUP)
            v = tl.reshape(groups * inverse[:, :, None], (ROWS, N))
    if CODES == "int":
        if MIDRISE:  # level k + 0.5 is code k: codes -(MAX + 0.5) … MAX - 0.5
            codes = tl.floor(v - 0.5 + u) if NOISE else tl.floor(v)
            codes = tl.minimum(tl.maximum(codes, -MAX - 0.5), MAX - 0.5)
        else:
            codes = tl.floor(v + u) if NOISE else _rne(v)
            if NOISE or SCALE != "fp32":  # |v| <= MAX against an exact fp32 scale: nearest stays on the grid
                codes = tl.minimum(tl.maximum(codes, -MAX), MAX)
        _store_codes(codes, data_ptr, rows, mask, BITS, N, ROWS)
    else:
        if CODES == "float":
            v = _round_to_float_grid(tl.minimum(tl.maximum(v, -MAX), MAX), u, MBITS, MIN_EXP, NOISE != 0)
        tl.store(data_ptr + rows[:, None] * N + tl.arange(0, N)[None, :], v.to(data_ptr.dtype.element_ty),
                 mask=mask[:, None])


# -- one copy of a tile: its row maximum (the e4m3 pre-pass) and its store -----------------------------
@triton.jit
def add_row_max(h, row_max_ptr, signs_ptr, b, mask, SLOT: tl.constexpr, SCALE: tl.constexpr, ROTATED: tl.constexpr,
                BASIS_ROTATED: tl.constexpr, N: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """Fold this tile's largest finite group absmax (in the copy's basis) into ``row_max[b, SLOT]`` (e4m3, log8)."""
    if _row_scaled(SCALE):
        v = to_basis(h, signs_ptr, BASIS_ROTATED, ROTATED, ROWS, N)
        tl.atomic_max(row_max_ptr + 2 * b + SLOT, finite_max(group_absmax(v, ROWS, N, GROUP), mask))


@triton.jit
def write_copy(h, data_ptr, scale_ptr, row_scale_ptr, row_max_ptr, signs_ptr, b, rows, mask, first, seed, step,
               weyl_ptr, row0, STREAM: tl.constexpr, CODES: tl.constexpr, BITS: tl.constexpr, MIDRISE: tl.constexpr,
               SCALE: tl.constexpr, MAX: tl.constexpr, MBITS: tl.constexpr, MIN_EXP: tl.constexpr,
               ROTATED: tl.constexpr, BASIS_ROTATED: tl.constexpr, NOISE: tl.constexpr, N: tl.constexpr,
               GROUP: tl.constexpr, ROWS: tl.constexpr, old_scale_ptr, old_row_ptr, hold, HOLD: tl.constexpr):
    """Store ``h`` (ROWS, N, in the kernel's basis) as one copy: rotated into the copy's basis if needed; with
    e4m3 scales the batch row's second-level scale comes from the pre-pass's ``row_max[b, STREAM]`` and the
    batch row's ``first`` program stores it.

    HOLD: held scales against this copy's previous write (``old_scale_ptr``, ``old_row_ptr``; `store_state`); an
    e4m3 row keeps its previous second-level scale where the new one is at most it (up to the slack) and at
    least a quarter of it, as `StateFormat._held_scale`."""
    v = to_basis(h, signs_ptr, BASIS_ROTATED, ROTATED, ROWS, N)
    keep_row = True
    if _row_scaled(SCALE):
        second = row_scale(tl.load(row_max_ptr + 2 * b + STREAM), MAX, SCALE)
        if HOLD:
            old_row = tl.load(old_row_ptr + b)
            keep_row = (second <= old_row * _SLACK) & (second >= old_row * _ROW_KEEP)
            second = tl.where(keep_row, old_row, second)
        tl.store(row_scale_ptr + b, second, mask=first)
    else:
        second = 0.0
    store_state(v, data_ptr, scale_ptr, second, rows, mask, seed, step, weyl_ptr, row0, STREAM, CODES, BITS,
                MIDRISE, SCALE, MAX, MBITS, MIN_EXP, NOISE, N, GROUP, ROWS, False, old_scale_ptr, keep_row, hold, HOLD)

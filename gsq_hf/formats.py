"""Storage formats for a recurrent state: what one element costs and how it is rounded.

A format is three composable parts, named ``<codes>[-<scale>][-hadamard]`` (``get_format`` parses any
combination; YAML may spell them ``{codes: midrise3, scale: e4m3, rotation: hadamard}``):

* **codes**: the grid of one element.

  ==============  =====================================================  ==========================
  codes           levels (in units of the group scale)                   stored as
  ==============  =====================================================  ==========================
  ``fp32``        float32 (lossless)                                     float32
  ``bf16/fp16``   bfloat16 / float16 (saturating), unscaled              bfloat16 / float16
  ``fp8``         float8 e4m3, scaled so the group absmax is 448         float8_e4m3fn
  ``intB``        B = 2..8: symmetric, 0, ±1 … ±(2**(B-1) − 1)            B bits, packed
  ``midriseB``    B = 2..8: mid-rise, ±0.5, ±1.5 … ±(2**(B-1) − 0.5):    B bits, packed
                  no zero level, so B bits give 2**B levels, not 2**B − 1
  ``levelsL``     L = 5 or 11: symmetric, 0, ±1 … ±(L − 1)/2             16 codes as one base-L number:
                                                                         levels5 in 5 bytes (2.5 bits),
                                                                         levels11 in 7 bytes (3.5 bits)
  ==============  =====================================================  ==========================

* **scale** (scaled codes only): one per group of ``group_size`` values along ``d_state``, the group's absmax
  over the largest level, stored as ``fp32`` (default, 32 bits), ``fp16`` (16), ``e4m3`` (8 bits: float8
  e4m3 of the scale over a second-level fp32 scale per batch row, the row's largest scale / 448, as NVFP4
  does), ``e4m3up`` (the same, rounded up instead of to nearest: no stored scale is below the exact one, so no
  value is clamped, at up to 12.5% coarser steps), ``log8`` (8 bits: a log-uniform code ``k`` over the same
  kind of per-row second-level scale, here the row's largest group scale: the scale is ``2**(-k/32)`` of it,
  32 steps per binade over 8 binades, ``k = 255`` an all-zero group; e4m3 has 8 steps per binade, so its
  rounding moves a group's top value by up to 6%, log8's by 1.1%) or ``e8m0`` (8 bits: the power of two at or
  above the scale, as the OCP microscaling formats do). Codes are computed against the stored (rounded) scale
  and clamped to the grid.
* **rotation** (``-hadamard``): an orthogonal randomized Hadamard transform along ``d_state`` (a power of
  two; fixed signs from seed 0, so a config names it completely) applied before rounding and undone after
  reading: it spreads a row's outliers over all its values, so absmax wastes less of the grid. A Mamba2 step
  keeps its state in the rotated basis instead (``rotated=True``: `gsq_hf.step.rotated_basis`).

``levelsL`` are the level counts that a block of 16 codes packs denser than a power-of-two grid of the same
stored bits (5 levels where int2 has 3 and midrise2 4; 11 where midrise3 has 8); every other L up to 15 packs
into the bytes of a grid with as many or more levels, so only these two exist. Block layout: digit ``i`` of
the block (code + (L − 1)/2) times ``L**i``, summed, little-endian in the block's bytes; d_state must be a
multiple of 16. They run on the torch path only (the fused kernel stores power-of-two grids).

Bit layout of packed codes (``B`` bits, code offset by ``2**(B-1)`` to unsigned): code ``i`` of a block at
bit ``i * B``, little-endian over the fewest bytes that hold whole codes (int4: 2 codes in 1 byte, int3: 8 in
3 bytes, int2: 4 in 1 byte), so ``d_state`` must be a multiple of the block; e.g. int4::

    bit  7 6 5 4 | 3 2 1 0
         q[2i+1]+8 | q[2i]+8

Rounding is ``nearest`` (round half to even), ``stochastic`` (round up with probability equal to the
distance from the lower neighbour, so the rounding error is zero in expectation: a state re-quantized
at every step then does not drift) or ``quasirandom`` (the same rule, thresholds from a low-discrepancy
sequence in time: `QuasiRandom`). Stochastic rounding draws from a caller-supplied ``torch.Generator``
so that runs are reproducible.

Stored bits per element, exactly: payload ``B`` + scale bits / ``group_size`` (+ 32 bits per batch row and
tensor for e4m3's and log8's second-level scale: `StateFormat.row_bytes`). This module imports torch only.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, replace

import torch

from . import packing
from .errors import GSQConfigError
from .packing import last_dim_view as _last_dim_view

__all__ = [
    "FORMATS",
    "QuantizedTensor",
    "QuasiRandom",
    "ROTATIONS",
    "ROUNDING_MODES",
    "SCALE_DTYPES",
    "StateFormat",
    "format_name",
    "get_format",
    "rotate",
    "rotate_rows",
]

ROUNDING_MODES = ("nearest", "stochastic", "quasirandom")
SCALE_DTYPES = {"fp32": 32, "fp16": 16, "e4m3": 8, "e4m3up": 8, "log8": 8, "e8m0": 8}  # bits of a group scale
_ROW_SCALED = ("e4m3", "e4m3up", "log8")  # 8-bit group scales over an fp32 second-level scale per batch row
_LOG8_STEPS = 32  # log8 codes per binade
_LOG8_ZERO = 255  # the log8 code of an all-zero group
ROTATIONS = ("hadamard",)
_TINY = torch.finfo(torch.float32).tiny
_E4M3_MAX = 448.0
_HOLD_SLACK = 1 + 2**-12  # a value read back at the top level can exceed it by a rotation's float error
_ROW_HOLD = 0.25  # a held e4m3 row scale up to 4x its row's need costs two of e4m3's ~17 binades of range


@dataclass(frozen=True)
class QuantizedTensor:
    """A stored state: ``data`` (+ per-group ``scale``) in ``fmt``, for a logical fp32 tensor of ``shape``."""

    data: torch.Tensor
    scale: torch.Tensor | None
    fmt: StateFormat
    group_size: int
    row_scale: torch.Tensor | None = None  # (batch,) fp32 second-level scale of e4m3 / log8 group scales

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated for this tensor (payload + scales + second-level scales)."""
        return sum(t.nbytes for t in (self.data, self.scale, self.row_scale) if t is not None)

    def dequantize(self, rotated: bool = False) -> torch.Tensor:
        """The fp32 tensor this storage represents (``rotated``: in the rotated basis, `StateFormat.dequantize`)."""
        return self.fmt.dequantize(self, rotated)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the fp32 tensor this storage represents."""
        return (*self.data.shape[:-1], self.fmt.logical_last_dim(self.data.shape[-1]))

    def map(self, fn) -> QuantizedTensor:
        """Apply ``fn`` to every stored tensor (device moves, batch indexing along dim 0)."""
        scale = fn(self.scale) if self.scale is not None else None
        row_scale = fn(self.row_scale) if self.row_scale is not None else None
        return QuantizedTensor(fn(self.data), scale, self.fmt, self.group_size, row_scale)


def _absmax(groups: torch.Tensor) -> torch.Tensor:
    """Largest |value| over the last dim (NaN if any is NaN).

    On CPU a reduction over a short *innermost* dim (a group of 16 contiguous values) costs about ten
    elementwise passes; halving with elementwise maxima costs about four. Over 32 or more contiguous values,
    or along a dim that is not innermost (a state laid out state-dim-outer, see `gsq_hf.adapters.mamba`), the
    plain reduction is faster (`python scripts/bench_decode_overhead.py`)."""
    values, n = groups.abs(), groups.shape[-1]
    if groups.is_cuda or n > 16 or n & (n - 1) or groups.stride(-1) != 1:
        return values.amax(dim=-1)
    while n > 1:
        n //= 2
        values = torch.maximum(values[..., :n], values[..., n:])
    return values[..., 0]


def _rotate(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``x @ matrix`` along the last dim, in ``x``'s memory layout (`_last_dim_view`)."""
    view, dim = _last_dim_view(x)
    return x @ matrix if dim == -1 else (matrix.T @ view).transpose(-1, -2)


def rotate(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x @ M`` (``inverse``: ``x @ Mᵀ``) along the last dim, M the ``-hadamard`` rotation of that length: into
    (out of) the basis that rotated formats store, in ``x``'s memory layout."""
    matrix = _hadamard(x.shape[-1], x.device)
    return _rotate(x, matrix.T if inverse else matrix)


def rotate_rows(x: torch.Tensor) -> torch.Tensor:
    """``x @ M`` along the last dim as `rotate`, in fp32, by log2(N) butterfly stages of sums and differences.

    Elementwise, so a row's result does not depend on the other rows or the tensor's shape; a BLAS product's
    bits can depend on how many rows it multiplies. B and C of a Mamba2 state kept in the rotated
    basis are rotated by this (a decode step's token, a scan's chunk of tokens): a chunked scan and a replay
    must store what decode steps store, bit for bit."""
    n = x.shape[-1]
    x = x.float() * _row_scale(n, x.device)  # x @ diag(signs) / √N, then @ H_N (Sylvester's, symmetric)
    half = n // 2
    while half:  # [x1, x2] @ H_2h = [(x1 + x2) @ H_h, (x1 - x2) @ H_h]
        pairs = x.unflatten(-1, (n // (2 * half), 2, half))
        first, second = pairs.unbind(-2)
        x = torch.stack((first + second, first - second), dim=-2).flatten(-3)
        half //= 2
    return x


_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # round(2**32 / φ): mixes the seed with the stream


def _noble_steps() -> tuple[int, ...]:
    """The 256 Weyl steps of `QuasiRandom`, as 32-bit fractions: the noble numbers [0; a1, a2, a3, a4, 1, 1, ...]
    with a1..a4 in 1..4 (each lies in 0.2 .. 0.83). A noble number's continued fraction ends in ones, like the
    golden ratio's, so each element's sequence of thresholds is as evenly spread over time as φ's; 256 distinct
    steps keep two elements' sequences from being shifted copies of each other (with one step for all, the
    errors of values that move alike were correlated: a bias in perplexity)."""
    golden = (1 + 5**0.5) / 2
    steps = []
    for prefix in itertools.product(range(1, 5), repeat=4):
        x = golden  # [1; 1, 1, ...]
        for a in reversed(prefix):
            x = a + 1 / x
        steps.append(round(2**32 / x) & _MASK32)
    return tuple(steps)


_NOBLE_STEPS = _noble_steps()


@functools.lru_cache(maxsize=16)
def noble_steps(device: torch.device) -> torch.Tensor:
    """`_noble_steps` as an int64 tensor on ``device`` (the fused kernel reads its steps from this table)."""
    return torch.tensor(_NOBLE_STEPS, dtype=torch.int64, device=device)


def _mul32(x: torch.Tensor | int, c: torch.Tensor | int) -> torch.Tensor | int:
    """``x * c mod 2**32`` for uint32 values held in int64, without overflowing int64 (two 16-bit halves)."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash (Wellons' lowbias32) of uint32 values held in int64 (or a Python int); the fused
    kernel computes the same bits in uint32 (`gsq_hf.kernels._triton_formats.mix32`)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


_STEP_SALT = 0x5BD1E995  # an offset's hash, salted, picks the element's step


@functools.lru_cache(maxsize=64)
def _weyl_terms(shape: tuple[int, ...], key: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint32 (in int64) offsets and steps of `QuasiRandom` thresholds for one batch row of ``shape``: the offset
    a hash of each element's row-major index, the step a noble number picked by the offset's hash. Cached per
    shape, so the layers of one shape share them: 16 bytes per element of a batch row per stream on the torch
    path (the fused kernel hashes in registers)."""
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=device).view(shape)
    offsets = mix32((index + key) & _MASK32)
    return offsets, noble_steps(device)[mix32(offsets ^ _STEP_SALT) & 255]


@dataclass(frozen=True)
class QuasiRandom:
    """The thresholds of ``quasirandom`` rounding at one write: element ``i`` rounds up where its distance from the
    lower level exceeds ``1 - u_i``, with ``u_i = frac(offset_i + step · α_i)``.

    Why: a state re-quantized at every token moves most of its values by a small fraction ``m`` of a step
    per token. Round-to-nearest drops such moves (the state stops decaying); stochastic rounding keeps them
    in expectation, but its independent draws add a random walk of error, variance ``m`` per token. With
    thresholds that step through a Weyl sequence over a value's successive writes (``α_i`` one of 256 noble
    numbers, `_noble_steps`, picked by a hash: evenly spread like the golden ratio's), a steady
    move ``m`` rounds up in a fraction ``m`` of the writes, evenly spread, so the summed error stays bounded
    instead of growing like a random walk (as error diffusion would, with no stored residual). ``offset_i`` is
    a hash of the element's row-major index within its batch row (dim 0: every batch row gets the same
    thresholds, so a sequence is stored the same whatever batch it is decoded in), ``seed`` and ``stream`` (the
    low and high copies and the conv window draw apart); ``step`` is the layer's write count (an int, or a
    device int64 scalar that a captured CUDA graph advances). Thresholds are 24-bit fractions, bit-identical in
    the fused kernel."""

    seed: int
    step: int | torch.Tensor
    stream: int = 0

    def uniform(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """fp32 thresholds in [0, 1) for a tensor of ``shape`` (batch first, unless it has one dim)."""
        key = mix32((self.seed + self.stream * _GOLDEN) & _MASK32)
        row = tuple(shape[1:]) if len(shape) > 1 else tuple(shape)
        offsets, steps = _weyl_terms(row, key, torch.device(device))
        bits = (offsets + _mul32(self.step & _MASK32, steps)) & _MASK32  # step: an int, or a device scalar
        return ((bits >> 8).float() * 2.0**-24).expand(shape)

    def for_stream(self, stream: int) -> QuasiRandom:
        return replace(self, stream=stream)


def _uniform(x: torch.Tensor, source: torch.Generator | QuasiRandom | None) -> torch.Tensor:
    """Thresholds in [0, 1) for rounding ``x`` up: a `QuasiRandom`'s, or drawn from the generator."""
    if isinstance(source, QuasiRandom):
        return source.uniform(x.shape, x.device).to(x.dtype)
    return torch.rand(x.shape, generator=source, device=x.device, dtype=x.dtype)


def _float_stochastic_round(x: torch.Tensor, mantissa_bits: int, min_exponent: int, generator) -> torch.Tensor:
    """Round fp32 ``x`` stochastically onto the grid of a float format with the given mantissa and exponent range.

    The grid spacing at ``x`` is ``2**(max(floor(log2|x|), min_exponent) - mantissa_bits)`` (subnormals share
    the spacing of the smallest normal binade), so the result is exactly representable in the target format.
    """
    _, exponent = torch.frexp(x)  # x = m * 2**exponent, 0.5 <= |m| < 1
    spacing = torch.ldexp(torch.ones_like(x), (exponent - 1).clamp(min=min_exponent) - mantissa_bits)
    scaled = x / spacing
    lower = torch.floor(scaled)
    return (lower + (_uniform(x, generator) < (scaled - lower)).to(x.dtype)) * spacing


@dataclass(frozen=True)
class StateFormat:
    """One storage format. ``kind`` is ``float`` (a torch dtype, optionally scaled per group) or ``int``."""

    name: str
    kind: str
    bits: float  # payload bits per value (levelsL: a 16-code block's bytes * 8 / 16)
    storage_dtype: torch.dtype
    scaled: bool
    max_code: float  # the largest level's magnitude (float: dtype max; int: 2**(bits-1) - 1, mid-rise - 0.5)
    mantissa_bits: int = 0
    min_exponent: int = 0
    midrise: bool = False  # int codes: levels at ±0.5, ±1.5, ... (no zero) instead of 0, ±1, ...
    scale_dtype: str = "fp32"  # how a group scale is stored (SCALE_DTYPES); scaled formats only
    rotation: str | None = None  # "hadamard": rotated along d_state before rounding, back after reading
    levels: int = 0  # levelsL: L levels packed as base-L numbers (0: a power-of-two grid packed bitwise)

    @property
    def lossless(self) -> bool:
        """True for fp32: storing and loading returns the value unchanged."""
        return self.name == "fp32"

    def represents(self, dtype: torch.dtype) -> bool:
        """True when every value of ``dtype`` is stored exactly (fp32 holds bf16/fp16; a dtype holds itself)."""
        return self.name == "fp32" or (not self.scaled and self.rotation is None and self.storage_dtype == dtype)

    @property
    def scale_bits(self) -> int:
        return SCALE_DTYPES[self.scale_dtype] if self.scaled else 0

    @property
    def row_bytes(self) -> int:
        """Bytes stored once per batch row of a tensor: e4m3's and log8's fp32 second-level scale."""
        return 4 if self.scaled and self.scale_dtype in _ROW_SCALED else 0

    def bits_per_element(self, group_size: int) -> float:
        """Stored bits per state element: payload + group scales (not the per-row `row_bytes`)."""
        return self.bits + self.scale_bits / group_size

    def nbytes(self, num_elements: int, group_size: int) -> int:
        """Bytes that ``num_elements`` values take in this format: payload + group scales (whole bytes each;
        `row_bytes` come on top, once per batch row)."""
        payload = math.ceil(num_elements * self.bits / 8)
        return payload + self.scale_bits // 8 * (num_elements // group_size)

    # -- quantize / dequantize -------------------------------------------------------------------------
    def quantize(
        self,
        x: torch.Tensor,
        group_size: int,
        rounding: str = "nearest",
        generator: torch.Generator | QuasiRandom | None = None,
        rotated: bool = False,
        previous: QuantizedTensor | None = None,
        hold: float = 0.0,
    ) -> QuantizedTensor:
        """Store ``x`` (any float dtype; last dim divisible by ``group_size``) in this format. ``rotated``: ``x`` is
        given in the rotated basis (`rotate`'s ``x @ M``), as a Mamba2 state kept there by the torch step.
        ``generator``: the thresholds of stochastic rounding (a `QuasiRandom` for ``quasirandom``, by default
        seed 0 at step 0).

        ``previous`` (this tensor's last stored value) and ``hold`` > 0: a group whose new scale is at most its
        previous one and at least ``hold`` of it keeps the previous one (`_held_scale`)."""
        x = x.float()
        if rounding == "quasirandom" and not isinstance(generator, QuasiRandom):
            generator = QuasiRandom(0, 0)
        if (self.rotation is not None) != rotated:
            x = rotate(x, inverse=rotated)
        if self.storage_dtype == torch.float32:  # fp32, rotated or not: nothing to round
            return QuantizedTensor(x.clone(), None, self, group_size)
        scale = stored_scale = row_scale = None
        if self.scaled:
            groups = x.unflatten(-1, (x.shape[-1] // group_size, group_size))
            scale = _absmax(groups) / self.max_code  # (..., n_groups); NaN/Inf if the group has one
            if hold > 0 and previous is not None and previous.fmt == self and previous.scale is not None \
                    and previous.scale.shape == scale.shape:
                scale, stored_scale, row_scale = self._held_scale(scale, previous, hold)
            else:
                scale, stored_scale, row_scale = self._store_scale(scale)
            x = (groups / scale.clamp_min(_TINY).unsqueeze(-1)).flatten(-2)  # all-zero groups stay zero
        if self.kind == "int":
            return QuantizedTensor(self._pack(self._codes(x, rounding, generator)), stored_scale, self, group_size,
                                   row_scale)
        x = x.clamp(-self.max_code, self.max_code)
        if rounding != "nearest":
            x = _float_stochastic_round(x, self.mantissa_bits, self.min_exponent, generator)
        return QuantizedTensor(x.to(self.storage_dtype), stored_scale, self, group_size, row_scale)

    def _codes(self, x: torch.Tensor, rounding: str, generator: torch.Generator | QuasiRandom | None) -> torch.Tensor:
        """int8 codes of ``x`` (in units of the scale): the nearest level, or a stochastic neighbour."""
        if self.midrise:  # level k + 0.5 is code k: the nearest level is floor(x)
            top = 2 ** (self.bits - 1)
            codes = torch.floor(x if rounding == "nearest" else x - 0.5 + _uniform(x, generator))
            return codes.clamp_(-top, top - 1).to(torch.int8)
        if rounding == "nearest":
            codes = x.round_()
            if self.scale_dtype != "fp32":  # a rounded stored scale can put |x| past the grid; an fp32 one cannot
                codes = codes.clamp_(-self.max_code, self.max_code)
            return codes.to(torch.int8)
        return torch.floor(x + _uniform(x, generator)).clamp_(-self.max_code, self.max_code).to(torch.int8)

    def _store_scale(self, scale: torch.Tensor, row: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(the fp32 scale the codes use, the scale as stored, the e4m3 / log8 second-level row scale or None); a
        ``row`` scale may be given (it must be at least `_row_of` the scales)."""
        if self.scale_dtype == "fp32":
            return scale, scale, None
        if self.scale_dtype == "fp16":
            stored = scale.clamp(max=torch.finfo(torch.float16).max).to(torch.float16)
            return stored.float(), stored, None
        if self.scale_dtype == "e8m0":
            mantissa, exponent = torch.frexp(scale)  # scale = m * 2**e, 0.5 <= m < 1: 2**e >= scale
            exponent = (exponent - (mantissa == 0.5).to(exponent.dtype)).clamp_(-127, 127)
            # an all-zero group takes the smallest scale, 2**-127: mid-rise codes have no zero level
            exponent = exponent.masked_fill_(scale == 0, -127).to(torch.int8)
            return torch.ldexp(torch.ones_like(scale), exponent.to(torch.int32)), exponent, None
        if row is None:
            row = self._row_of(scale)
        row_view = row.view(-1, *([1] * (scale.dim() - 1)))
        ratio = scale / row_view.clamp_min(_TINY)
        if self.scale_dtype == "log8":  # nearest in log space; an all-zero (or non-finite) group gets code 255
            code = (torch.log2(ratio) * -_LOG8_STEPS).round_().clamp_(0, _LOG8_ZERO - 1)
            stored = torch.where(ratio > 0, code, _LOG8_ZERO).to(torch.uint8)
            return _log8_values(scale.device)[stored.long()] * row_view, stored, row
        stored = ratio.to(torch.float8_e4m3fn)
        if self.scale_dtype == "e4m3up":
            # the next e4m3 value up where nearest went below (positive e4m3 bit patterns are ordered by value)
            below = (stored.float() < ratio) & (stored.float() < _E4M3_MAX)
            stored = torch.where(below, (stored.view(torch.uint8) + 1).view(torch.float8_e4m3fn), stored)
        return stored.float() * row_view, stored, row

    def _row_of(self, scale: torch.Tensor) -> torch.Tensor:
        """The second-level scale per batch row: the row's largest finite group scale (a non-finite group, which
        the cache keeps in fp32, must not spoil the other groups of its row); for e4m3, over e4m3's largest value."""
        row = torch.nan_to_num(scale, nan=0.0, posinf=0.0).flatten(1).amax(dim=1)
        return row if self.scale_dtype == "log8" else row / _E4M3_MAX

    def _held_scale(self, scale: torch.Tensor, previous: QuantizedTensor, hold: float):
        """`_store_scale` with hysteresis. A fresh scale at every write re-rounds every code of a group whenever
        its absmax moves, and with an e4m3 scale whenever the row's largest group moves (the fp32 row scale
        follows it): values that did not move get fresh rounding error at every token, which builds up along
        a long gap (docs/formats.md "Held scales"). Here a group keeps its stored scale while its new absmax
        fits under it (nothing clamped beyond the float error of re-reading a top-level value: `_HOLD_SLACK`) and
        is at least ``hold`` of it; an e4m3 / log8 row scale is kept likewise down to a quarter (its groups then
        keep their stored 8-bit values exactly)."""
        old = self._load_scale(previous)
        if self.scale_dtype in _ROW_SCALED:
            row_new = self._row_of(scale)
            keep_row = (row_new <= previous.row_scale * _HOLD_SLACK) & (row_new >= previous.row_scale * _ROW_HOLD)
            row = torch.where(keep_row, previous.row_scale, row_new)
            fresh_scale, fresh_stored, _ = self._store_scale(scale, row)
            keep = keep_row.view(-1, *([1] * (scale.dim() - 1))) & (scale <= old * _HOLD_SLACK) & (scale >= old * hold)
            stored = torch.where(keep, previous.scale, fresh_stored)
            return torch.where(keep, old, fresh_scale), stored, row
        fresh_scale, fresh_stored, _ = self._store_scale(scale)
        keep = (scale <= old * _HOLD_SLACK) & (scale >= old * hold)
        return torch.where(keep, old, fresh_scale), torch.where(keep, previous.scale, fresh_stored), None

    def _load_scale(self, q: QuantizedTensor) -> torch.Tensor:
        if self.scale_dtype == "e8m0":
            return torch.ldexp(torch.ones(q.scale.shape, device=q.scale.device), q.scale.to(torch.int32))
        if self.scale_dtype in _ROW_SCALED:
            row = q.row_scale.view(-1, *([1] * (q.scale.dim() - 1)))
            if self.scale_dtype == "log8":
                return _log8_values(q.scale.device)[q.scale.long()] * row
            return q.scale.float() * row
        return q.scale if self.scale_dtype == "fp32" else q.scale.float()

    def dequantize(self, q: QuantizedTensor, rotated: bool = False) -> torch.Tensor:
        """fp32 values of ``q`` (``rotated``: in the rotated basis, `rotate`'s ``x @ M``, whatever the format's)."""
        values = self._unpack(q.data) if self.kind == "int" else q.data.float()  # int8 × fp32 promotes below
        if self.midrise:
            values = values + 0.5
        if q.scale is not None:
            groups = values.unflatten(-1, (values.shape[-1] // q.group_size, q.group_size))
            values = (groups * self._load_scale(q).unsqueeze(-1)).flatten(-2)
        if (self.rotation is not None) != rotated:
            values = rotate(values.float(), inverse=not rotated)
        return values

    def roundtrip(self, x: torch.Tensor, group_size: int, rounding: str = "nearest", generator=None) -> torch.Tensor:
        """``dequantize(quantize(x))``: the value a reader of the stored state sees."""
        return self.quantize(x, group_size, rounding, generator).dequantize()

    # -- helpers ---------------------------------------------------------------------------------------
    def logical_last_dim(self, stored_last_dim: int) -> int:
        """The fp32 tensor's last dim for a stored last dim (sub-byte formats pack several codes per byte)."""
        per, nbytes = self._block
        return stored_last_dim * per // nbytes

    def stored_last_dim(self, last_dim: int) -> int:
        per, nbytes = self._block
        return last_dim * nbytes // per

    @property
    def codes_per_block(self) -> int:
        """The last dim must be a multiple of this (1 for byte formats, 2 for int4, 4 for int2, 8 for int3, 16 for
        levelsL)."""
        return self._block[0]

    @property
    def _block(self) -> tuple[int, int]:
        """(values, stored elements) of one block (`gsq_hf.packing.block`)."""
        return packing.block(self)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        return packing.pack(self, codes)

    def _unpack(self, data: torch.Tensor) -> torch.Tensor:
        return packing.unpack(self, data)


FORMATS: dict[str, StateFormat] = {
    f.name: f
    for f in (
        StateFormat("fp32", "float", 32, torch.float32, False, float(torch.finfo(torch.float32).max)),
        StateFormat("bf16", "float", 16, torch.bfloat16, False, float(torch.finfo(torch.bfloat16).max), 7, -126),
        StateFormat("fp16", "float", 16, torch.float16, False, float(torch.finfo(torch.float16).max), 10, -14),
        StateFormat("fp8", "float", 8, torch.float8_e4m3fn, True, 448.0, 3, -6),
        StateFormat("int8", "int", 8, torch.int8, True, 127.0),
        StateFormat("int7", "int", 7, torch.uint8, True, 63.0),  # 8 codes in 7 bytes; d_state % 8 == 0
        StateFormat("int6", "int", 6, torch.uint8, True, 31.0),  # 4 codes in 3 bytes
        StateFormat("int5", "int", 5, torch.uint8, True, 15.0),  # 8 codes in 5 bytes
        StateFormat("int4", "int", 4, torch.uint8, True, 7.0),
        StateFormat("int3", "int", 3, torch.uint8, True, 3.0),  # 8 codes in 3 bytes; d_state % 8 == 0
        StateFormat("int2", "int", 2, torch.uint8, True, 1.0),  # ternary codes -1, 0, 1; 4 in a byte
        *(StateFormat(f"midrise{b}", "int", b, torch.int8 if b == 8 else torch.uint8, True, 2 ** (b - 1) - 0.5,
                      midrise=True) for b in range(8, 1, -1)),
        StateFormat("levels11", "int", 3.5, torch.uint8, True, 5.0, levels=11),  # 16 codes in 7 bytes
        StateFormat("levels5", "int", 2.5, torch.uint8, True, 2.0, levels=5),  # 16 codes in 5 bytes
    )
}
"""The code grids with an fp32 scale (where scaled) and no rotation; `get_format` composes the rest."""

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_ACCEPTED = ("<codes>[-<scale>][-hadamard] with codes one of " + ", ".join(FORMATS) + "; scale one of "
             + ", ".join(SCALE_DTYPES) + " (scaled codes only: fp8, int*, midrise*)")


def format_name(codes: str, scale: str = "fp32", rotation: str | None = None) -> str:
    """The canonical name of a combination of parts (``int4``, ``midrise3-e4m3-hadamard``)."""
    return "-".join([codes, *([scale] if scale != "fp32" else []), *([rotation] if rotation else [])])


def get_format(name: str | torch.dtype | dict) -> StateFormat:
    """A format by name (``"int8"``, ``"midrise3-e4m3-hadamard"``), by torch float dtype, or by parts
    (``{"codes": "int4", "scale": "e4m3", "rotation": "hadamard"}``); bad names list what is accepted."""
    if isinstance(name, torch.dtype):
        name = _DTYPE_NAMES.get(name, str(name))
    if isinstance(name, dict):
        name = _name_of_parts(name)
    if not isinstance(name, str):
        raise GSQConfigError(f"a state format is a name or a mapping of parts, got {type(name).__name__}")
    return _composed(name)


def _name_of_parts(parts: dict) -> str:
    unknown = sorted(map(str, set(parts) - {"codes", "scale", "rotation"}))
    if unknown or "codes" not in parts:
        raise GSQConfigError(f"a state format given by parts takes 'codes' (required), 'scale', 'rotation'; got "
                             f"{sorted(map(str, parts))} (the group size is GSQConfig.group_size)")
    return format_name(str(parts["codes"]), str(parts.get("scale") or "fp32"), parts.get("rotation"))


@functools.cache
def _composed(name: str) -> StateFormat:
    codes, *rest = name.split("-")
    base = FORMATS.get(codes)
    rotation = rest.pop() if rest and rest[-1] in ROTATIONS else None
    scale = rest.pop() if rest and rest[-1] in SCALE_DTYPES else "fp32"
    if base is None or rest or (scale != "fp32" and not base.scaled):
        raise GSQConfigError(f"unknown state format {name!r}; accepted: {_ACCEPTED}")
    fmt = replace(base, name=format_name(codes, scale, rotation), scale_dtype=scale, rotation=rotation)
    if fmt.name != name:  # parts out of order, or fp32 spelled out: one name per format
        raise GSQConfigError(f"state format {name!r} is spelled {fmt.name!r}; accepted: {_ACCEPTED}")
    return fmt


@functools.lru_cache(maxsize=16)
def _log8_values(device: torch.device) -> torch.Tensor:
    """fp32 group scale over the row scale for each log8 code: ``2**(-k/32)``, 0 for `_LOG8_ZERO` (a table, so
    that every reader gets the same bits)."""
    values = [2.0 ** (-k / _LOG8_STEPS) for k in range(_LOG8_ZERO)] + [0.0]
    return torch.tensor(values, dtype=torch.float32, device=device)


@functools.cache
def _hadamard_cpu(n: int) -> torch.Tensor:
    """The orthogonal ``diag(signs) · H_n / sqrt(n)`` (Sylvester's H_n; signs from seed 0), float32."""
    if n < 2 or n & (n - 1):
        raise GSQConfigError(f"the hadamard rotation needs d_state (the rotated dimension) to be a power of two, "
                             f"got {n}; use a format without -hadamard")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    return (signs[:, None] * h / math.sqrt(n)).contiguous()


_HADAMARD: dict[tuple[int, torch.device], torch.Tensor] = {}
_ROW_SCALE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _hadamard(n: int, device: torch.device) -> torch.Tensor:
    key = (n, device)
    if key not in _HADAMARD:
        _HADAMARD[key] = _hadamard_cpu(n).to(device)
    return _HADAMARD[key]


def _row_scale(n: int, device: torch.device) -> torch.Tensor:
    """``signs / √n``: the rotation's first column (Sylvester's H has ones there), what `rotate_rows` scales by."""
    key = (n, device)
    if key not in _ROW_SCALE:
        _ROW_SCALE[key] = _hadamard(n, device)[:, 0].contiguous()
    return _ROW_SCALE[key]

"""Storage formats for a recurrent state: what one element costs and how it is rounded.

A state tensor is quantized in groups along its last dimension (the SSM state dimension ``d_state``):
each group of ``group_size`` values shares one fp32 scale (absmax / largest code). Formats:

==========  ============================  =============================  ======================
name        stored as                     scale                          payload bits / value
==========  ============================  =============================  ======================
``fp32``    float32                       none                           32
``bf16``    bfloat16                      none                           16
``fp16``    float16 (saturating)          none                           16
``fp8``     float8_e4m3fn                 fp32 per group, absmax / 448   8
``int8``    int8 in [-127, 127]           fp32 per group, absmax / 127   8
``int4``    uint8, two codes per byte     fp32 per group, absmax / 7     4
==========  ============================  =============================  ======================

int4 packing (one byte holds elements ``2i`` and ``2i + 1`` of a group, codes offset by 8)::

    bit  7 6 5 4 | 3 2 1 0
         q[2i+1]+8 | q[2i]+8

Rounding is ``nearest`` (round half to even) or ``stochastic`` (round up with probability equal to the
distance from the lower neighbour, so the rounding error is zero in expectation: a state re-quantized
at every step then does not drift). Stochastic rounding draws from a caller-supplied ``torch.Generator``
so that runs are reproducible.

This module imports torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import GSQConfigError

__all__ = [
    "FORMATS",
    "QuantizedTensor",
    "ROUNDING_MODES",
    "StateFormat",
    "get_format",
]

ROUNDING_MODES = ("nearest", "stochastic")
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class QuantizedTensor:
    """A stored state: ``data`` (+ per-group ``scale``) in ``fmt``, for a logical fp32 tensor of ``shape``."""

    data: torch.Tensor
    scale: torch.Tensor | None
    fmt: StateFormat
    group_size: int

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated for this tensor (payload + scales)."""
        return self.data.nbytes + (self.scale.nbytes if self.scale is not None else 0)

    def dequantize(self) -> torch.Tensor:
        """The fp32 tensor this storage represents."""
        return self.fmt.dequantize(self)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the fp32 tensor this storage represents."""
        return (*self.data.shape[:-1], self.fmt.logical_last_dim(self.data.shape[-1]))

    def map(self, fn) -> QuantizedTensor:
        """Apply ``fn`` to every stored tensor (device moves, batch indexing along dim 0)."""
        scale = fn(self.scale) if self.scale is not None else None
        return QuantizedTensor(fn(self.data), scale, self.fmt, self.group_size)


def _float_stochastic_round(x: torch.Tensor, mantissa_bits: int, min_exponent: int, generator) -> torch.Tensor:
    """Round fp32 ``x`` stochastically onto the grid of a float format with the given mantissa and exponent range.

    The grid spacing at ``x`` is ``2**(max(floor(log2|x|), min_exponent) - mantissa_bits)`` (subnormals share
    the spacing of the smallest normal binade), so the result is exactly representable in the target format.
    """
    _, exponent = torch.frexp(x)  # x = m * 2**exponent, 0.5 <= |m| < 1
    spacing = torch.ldexp(torch.ones_like(x), (exponent - 1).clamp(min=min_exponent) - mantissa_bits)
    scaled = x / spacing
    lower = torch.floor(scaled)
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (lower + (noise < (scaled - lower)).to(x.dtype)) * spacing


@dataclass(frozen=True)
class StateFormat:
    """One storage format. ``kind`` is ``float`` (a torch dtype, optionally scaled per group) or ``int``."""

    name: str
    kind: str
    bits: int
    storage_dtype: torch.dtype
    scaled: bool
    max_code: float  # largest representable magnitude after scaling (float: dtype max; int: 2**(bits-1) - 1)
    mantissa_bits: int = 0
    min_exponent: int = 0

    @property
    def lossless(self) -> bool:
        """True for fp32: storing and loading returns the value unchanged."""
        return self.name == "fp32"

    def represents(self, dtype: torch.dtype) -> bool:
        """True when every value of ``dtype`` is stored exactly (fp32 holds bf16/fp16; a dtype holds itself)."""
        return self.name == "fp32" or (not self.scaled and self.storage_dtype == dtype)

    def bits_per_element(self, group_size: int) -> float:
        """Stored bits per state element, scale overhead included."""
        return self.bits + (32.0 / group_size if self.scaled else 0.0)

    def nbytes(self, num_elements: int, group_size: int) -> int:
        """Bytes that ``num_elements`` values take in this format (payload + fp32 scales)."""
        payload = math.ceil(num_elements * self.bits / 8)
        return payload + (4 * (num_elements // group_size) if self.scaled else 0)

    # -- quantize / dequantize -------------------------------------------------------------------------
    def quantize(
        self,
        x: torch.Tensor,
        group_size: int,
        rounding: str = "nearest",
        generator: torch.Generator | None = None,
    ) -> QuantizedTensor:
        """Store ``x`` (any float dtype; last dim divisible by ``group_size``) in this format."""
        x = x.float()
        if self.name == "fp32":
            return QuantizedTensor(x.clone(), None, self, group_size)
        scale = None
        if self.scaled:
            groups = x.unflatten(-1, (x.shape[-1] // group_size, group_size))
            scale = groups.abs().amax(dim=-1) / self.max_code  # (..., n_groups); NaN/Inf if the group has one
            x = (groups / scale.clamp_min(_TINY).unsqueeze(-1)).flatten(-2)  # all-zero groups stay zero
        if self.kind == "int":
            if rounding == "nearest":  # |x| <= max_code already: the scale comes from the group's absmax
                codes = x.round_().to(torch.int8)
            else:  # floor(x + u) can reach max_code + 1
                codes = torch.floor(x + self._noise(x, generator)).clamp_(-self.max_code, self.max_code).to(torch.int8)
            return QuantizedTensor(self._pack(codes), scale, self, group_size)
        x = x.clamp(-self.max_code, self.max_code)
        if rounding == "stochastic":
            x = _float_stochastic_round(x, self.mantissa_bits, self.min_exponent, generator)
        return QuantizedTensor(x.to(self.storage_dtype), scale, self, group_size)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        """fp32 values of ``q``."""
        values = self._unpack(q.data) if self.kind == "int" else q.data.float()  # int8 × fp32 promotes below
        if q.scale is None:
            return values
        groups = values.unflatten(-1, (values.shape[-1] // q.group_size, q.group_size))
        return (groups * q.scale.unsqueeze(-1)).flatten(-2)

    def roundtrip(self, x: torch.Tensor, group_size: int, rounding: str = "nearest", generator=None) -> torch.Tensor:
        """``dequantize(quantize(x))``: the value a reader of the stored state sees."""
        return self.quantize(x, group_size, rounding, generator).dequantize()

    # -- helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def logical_last_dim(self, stored_last_dim: int) -> int:
        """The fp32 tensor's last dim for a stored last dim (sub-byte formats pack several codes per byte)."""
        per, nbytes = self._block
        return stored_last_dim * per // nbytes

    def stored_last_dim(self, last_dim: int) -> int:
        per, nbytes = self._block
        return last_dim * nbytes // per

    @property
    def codes_per_block(self) -> int:
        """The last dim must be a multiple of this (1 for byte formats, 2 for int4 and 4 for int2, 8 for int3)."""
        return self._block[0]

    @property
    def _block(self) -> tuple[int, int]:
        """(values, stored elements) of one block: sub-byte ints pack the fewest codes that fill whole bytes
        (int4: 2 in 1, int2: 4 in 1, int3: 8 in 3); every other format stores one value per element."""
        if self.kind != "int":
            return 1, 1  # one value per stored element of its dtype
        codes = 8 // math.gcd(self.bits, 8)
        return codes, codes * self.bits // 8

    def _pieces(self, per: int, nbytes: int):
        """(code i, byte k, shift): bits of code i that land in byte k, at ``i * bits - 8 * k`` within it."""
        for i in range(per):
            for k in range(nbytes):
                shift = i * self.bits - 8 * k
                if -self.bits < shift < 8:
                    yield i, k, shift

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Sub-byte codes, offset to unsigned, packed little-endian: code i of a block at bit ``i * bits``.

        Built from strided slices (code i of every block at once), so no reduction runs on the per-token path.
        """
        if self.bits == 8:
            return codes
        per, nbytes = self._block
        work = torch.uint8 if nbytes == 1 else torch.int16  # one-byte blocks: bits past 8 simply drop
        unsigned = (codes + (1 << (self.bits - 1))).to(work)
        out: list = [None] * nbytes
        for i, k, shift in self._pieces(per, nbytes):
            part = unsigned[..., i::per]
            part = part if shift == 0 else part << shift if shift > 0 else part >> -shift
            out[k] = part if out[k] is None else out[k] | part
        if nbytes == 1:
            return out[0]
        return torch.stack([byte & 0xFF for byte in out], dim=-1).to(torch.uint8).flatten(-2)

    def _unpack(self, data: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return data
        per, nbytes = self._block
        blocks = (data if nbytes == 1 else data.to(torch.int16)).unflatten(-1, (-1, nbytes))
        codes: list = [None] * per
        for i, k, shift in self._pieces(per, nbytes):
            part = blocks[..., k]
            part = part if shift == 0 else part >> shift if shift > 0 else part << -shift
            codes[i] = part if codes[i] is None else codes[i] | part
        mask, offset = (1 << self.bits) - 1, 1 << (self.bits - 1)
        return torch.stack([(code & mask).to(torch.int8) - offset for code in codes], dim=-1).flatten(-2)


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
    )
}

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def get_format(name: str | torch.dtype) -> StateFormat:
    """Look a format up by name (``"int8"``) or by torch float dtype; unknown names list the accepted ones."""
    if isinstance(name, torch.dtype):
        name = _DTYPE_NAMES.get(name, str(name))
    try:
        return FORMATS[name]
    except KeyError:
        raise GSQConfigError(f"unknown state format {name!r}; accepted: {', '.join(FORMATS)}") from None

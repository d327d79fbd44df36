"""How integer codes sit in bytes: bitwise packing of power-of-two grids, base-L packing of ``levelsL`` grids.

A block is the fewest codes that fill whole bytes: int4 2 codes in 1 byte, int2 4 in 1, int3 8 in 3 (code i
of a block at bit ``i * bits``, little-endian, offset by ``2**(bits-1)`` to unsigned); levels5 16 in 5 bytes
and levels11 16 in 7 (the block's 16 digits, code + (L − 1)/2, as one base-L number ``Σ digit_i · L**i``,
its bytes little-endian). Every function keeps the codes' memory layout (`last_dim_view`): a state stored
state-dim-outer packs along its non-innermost last dim, so every pass stays vectorized. Torch only.
"""

from __future__ import annotations

import math

import torch

__all__ = ["block", "last_dim_view", "pack", "unpack"]

LEVELS_BLOCK = 16  # codes per base-L block


def last_dim_view(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` and the dim its logical last dim sits at, in an order where the innermost dim stays innermost:
    ``(x, -1)``, or for a state stored last-dim-outer (stride(-1) > 1, see `gsq_hf.adapters.mamba`)
    ``(x.transpose(-1, -2), -2)``. Packing and rotating in that order keep the memory layout, so every
    elementwise pass of the decode step stays vectorized along the innermost dim."""
    if x.dim() < 2 or x.stride(-1) == 1:
        return x, -1
    return x.transpose(-1, -2), -2


def block(fmt) -> tuple[int, int]:
    """(values, stored elements) of one block of ``fmt``; one value per element for byte-wide formats."""
    if fmt.kind != "int":
        return 1, 1  # one value per stored element of its dtype
    if fmt.levels:
        return LEVELS_BLOCK, _levels_bytes(fmt.levels)
    codes = 8 // math.gcd(fmt.bits, 8)
    return codes, codes * fmt.bits // 8


def _pieces(bits: int, per: int, nbytes: int):
    """(code i, byte k, shift): bits of code i that land in byte k, at ``i * bits - 8 * k`` within it."""
    for i in range(per):
        for k in range(nbytes):
            shift = i * bits - 8 * k
            if -bits < shift < 8:
                yield i, k, shift


def pack(fmt, codes: torch.Tensor) -> torch.Tensor:
    """int8 codes of ``fmt``'s grid as stored bytes. Bitwise packing is built from strided slices (code i of
    every block at once), so no reduction runs on the per-token path."""
    if fmt.levels:
        return _pack_levels(fmt.levels, codes)
    if fmt.bits == 8:
        return codes
    per, nbytes = block(fmt)
    work = torch.uint8 if nbytes == 1 else torch.int16  # one-byte blocks: bits past 8 simply drop
    view, dim = last_dim_view(codes)
    blocks = (view + (1 << (fmt.bits - 1))).to(work).unflatten(dim, (-1, per))
    out: list = [None] * nbytes
    for i, k, shift in _pieces(fmt.bits, per, nbytes):
        part = blocks.select(dim, i)
        part = part if shift == 0 else part << shift if shift > 0 else part >> -shift
        out[k] = part if out[k] is None else out[k] | part
    packed = out[0] if nbytes == 1 else torch.stack([b & 0xFF for b in out], dim=dim).to(torch.uint8).flatten(
        dim - 1, dim)
    return packed if dim == -1 else packed.transpose(-1, -2)


def unpack(fmt, data: torch.Tensor) -> torch.Tensor:
    """The int8 codes of stored bytes (`pack`'s inverse)."""
    if fmt.levels:
        return _unpack_levels(fmt.levels, data)
    if fmt.bits == 8:
        return data
    per, nbytes = block(fmt)
    view, dim = last_dim_view(data)
    blocks = (view if nbytes == 1 else view.to(torch.int16)).unflatten(dim, (-1, nbytes))
    codes: list = [None] * per
    for i, k, shift in _pieces(fmt.bits, per, nbytes):
        part = blocks.select(dim, k)
        part = part if shift == 0 else part >> shift if shift > 0 else part << -shift
        codes[i] = part if codes[i] is None else codes[i] | part
    mask, offset = (1 << fmt.bits) - 1, 1 << (fmt.bits - 1)
    values = torch.stack([(code & mask).to(torch.int8) - offset for code in codes], dim=dim).flatten(dim - 1, dim)
    return values if dim == -1 else values.transpose(-1, -2)


def _levels_bytes(levels: int) -> int:
    """The fewest bytes that hold every base-L number of 16 digits."""
    return -(-(levels**LEVELS_BLOCK - 1).bit_length() // 8)


def _pack_levels(levels: int, codes: torch.Tensor) -> torch.Tensor:
    """Each block of 16 codes as one base-L int64 (digit i times L**i, < 2**63 for L <= 15), its low bytes."""
    nbytes = _levels_bytes(levels)
    view, dim = last_dim_view(codes)
    digits = (view.to(torch.int64) + levels // 2).unflatten(dim, (-1, LEVELS_BLOCK))
    powers = torch.tensor([levels**i for i in range(LEVELS_BLOCK)], dtype=torch.int64, device=codes.device)
    number = (digits * powers.view(LEVELS_BLOCK, *([1] * (-1 - dim)))).sum(dim)
    packed = torch.stack([(number >> (8 * k)) & 0xFF for k in range(nbytes)], dim=dim).to(torch.uint8)
    packed = packed.flatten(dim - 1, dim)
    return packed if dim == -1 else packed.transpose(-1, -2)


def _unpack_levels(levels: int, data: torch.Tensor) -> torch.Tensor:
    nbytes = _levels_bytes(levels)
    view, dim = last_dim_view(data)
    blocks = view.unflatten(dim, (-1, nbytes)).to(torch.int64)
    number = sum(blocks.select(dim, k) << (8 * k) for k in range(nbytes))
    digits = []
    for _ in range(LEVELS_BLOCK):
        digits.append(number % levels)
        number = number // levels
    values = (torch.stack(digits, dim=dim).flatten(dim - 1, dim) - levels // 2).to(torch.int8)
    return values if dim == -1 else values.transpose(-1, -2)

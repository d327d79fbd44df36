"""A decode step's depthwise causal conv in Triton: window shift, append, conv + SiLU and the window store in one pass.

Why: the torch conv of a single-token forward is a chain of small ops per layer (read the stored window and cast
it, concatenate the token, ``conv1d``, SiLU, slice, quantize and store the new window), each a launch and a round
trip through memory for a few KB. Here one program loads BLOCK channels' stored windows (K values each, in the
cache's conv format: `_triton_formats.load_state` with N = GROUP = K), shifts them by one in registers
(``tl.gather``: data movement only, so an fp32 window is moved bit for bit), appends the token's input, stores
the new window and writes ``silu(window · w + bias)``.

Where it runs (`gsq_hf.step`): Mamba-1 families launch `conv_step` on its own before ``x_proj``: their B, C and
Δ are projections of the conv output of *all* channels, so the state update cannot start before every channel's
conv is done, and Triton has no grid-wide barrier. Mamba2's conv output *is* x, B and C (xBC, split), so its
state-update kernel calls `conv_channels` itself (`gsq_hf.kernels.state_update`, ``conv=``): one launch per
layer for conv + state.

Rounding is the torch path's: the window is read in the model dtype (``ACT``), the products are taken in the
weight dtype (``WDT``), the sum is rounded there, SiLU in fp32 rounded back to ``WDT`` and to ``ACT`` (explicit
round-to-nearest-even onto the dtype's grid: the interpreter truncates casts). The sum's order differs from
``conv1d``'s, so the output agrees within float rounding, the stored window exactly (nearest rounding).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..formats import QuantizedTensor
from ._triton_formats import _INF, _round_to_float_grid, format_constants, load_state, store_state
from .reference import ConvStep, conv_unsupported_reason, empty_storage

__all__ = ["conv_channels", "conv_constants", "conv_pointers", "conv_step"]

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _on_grid(v, DTYPE: tl.constexpr):
    """fp32 ``v`` rounded to nearest even onto ``DTYPE``'s grid (fp16 overflows to ±inf, as a cast does)."""
    if DTYPE == "bf16":
        return _round_to_float_grid(v, 0.0, 7, -126, False)
    elif DTYPE == "fp16":
        r = _round_to_float_grid(v, 0.0, 10, -14, False)
        return tl.where(tl.abs(r) > 65504.0, tl.where(r > 0, _INF, -_INF), r)
    else:
        return v


@triton.jit
def conv_channels(win_ptr, win_scale_ptr, out_win_ptr, out_win_scale_ptr, u_ptr, w_ptr, bias_ptr, b, channels, mask,
                  write, conv_dim, stride_u, WRITE: tl.constexpr, CONV: tl.constexpr, CONV_BITS: tl.constexpr,
                  CONV_MIDRISE: tl.constexpr, CONV_SCALE: tl.constexpr, CONV_MAX: tl.constexpr,
                  CONV_MBITS: tl.constexpr, CONV_MIN_EXP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                  WDT: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr):
    """The activated conv output (ROWS,) of ``channels`` of batch row ``b``, on the ACT grid; with WRITE, stores
    the new windows of the channels where ``mask & write``.

    Window rows: (batch, conv_dim, K) contiguous, row = b·conv_dim + channel; ``u``: the token's inputs,
    (batch, conv_dim) with batch stride ``stride_u``.
    """
    rows = b.to(tl.int64) * conv_dim + channels  # (ROWS,)
    k = tl.arange(0, K)
    old = load_state(win_ptr, win_scale_ptr, win_scale_ptr, b, rows, mask, CONV, CONV_BITS, CONV_MIDRISE, CONV_SCALE,
                     K, K, ROWS)  # (ROWS, K) fp32
    shifted = tl.gather(old, tl.zeros((ROWS, K), tl.int32) + tl.minimum(k + 1, K - 1)[None, :], axis=1)
    u = tl.load(u_ptr + b * stride_u + channels, mask=mask, other=0.0).to(tl.float32)
    window = tl.where(k[None, :] == K - 1, u[:, None], _on_grid(shifted, ACT))  # (ROWS, K): read as the model dtype
    if WRITE:  # group = K: one scale per window; nearest rounding, dividing by the scale as gsq_hf.formats does
        stored = mask & (tl.zeros((ROWS,), tl.int1) | write)  # (a scalar `write` broadcast as a mask)
        store_state(window, out_win_ptr, out_win_scale_ptr, 0.0, rows, stored, 0, 0, out_win_ptr, 0, 2, CONV, CONV_BITS,
                    CONV_MIDRISE, CONV_SCALE, CONV_MAX, CONV_MBITS, CONV_MIN_EXP, False, K, K, ROWS, True,
                    out_win_scale_ptr, True, 0.0, False)  # DIVIDE; no held scales
    w = tl.load(w_ptr + channels[:, None] * K + k[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    acc = tl.sum(_on_grid(window, WDT) * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + channels, mask=mask, other=0.0).to(tl.float32)
    acc = _on_grid(acc, WDT)
    return _on_grid(_on_grid(acc / (1.0 + tl.exp(-acc)), WDT), ACT)  # silu


@triton.jit
def _conv_kernel(win_ptr, win_scale_ptr, out_win_ptr, out_win_scale_ptr, u_ptr, w_ptr, bias_ptr, out_ptr,
                 conv_dim, stride_u, stride_out, CONV: tl.constexpr, CONV_BITS: tl.constexpr,
                 CONV_MIDRISE: tl.constexpr, CONV_SCALE: tl.constexpr, CONV_MAX: tl.constexpr,
                 CONV_MBITS: tl.constexpr, CONV_MIN_EXP: tl.constexpr, CONV_ROTATED: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, WDT: tl.constexpr, K: tl.constexpr,
                 BLOCK: tl.constexpr):
    """One program = BLOCK channels of one batch row: grid (conv_dim / BLOCK, batch)."""
    b = tl.program_id(1)
    channels = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = channels < conv_dim
    out = conv_channels(win_ptr, win_scale_ptr, out_win_ptr, out_win_scale_ptr, u_ptr, w_ptr, bias_ptr, b, channels,
                        mask, True, conv_dim, stride_u, True, CONV, CONV_BITS, CONV_MIDRISE, CONV_SCALE, CONV_MAX,
                        CONV_MBITS, CONV_MIN_EXP, HAS_BIAS, ACT, WDT, K, BLOCK)
    tl.store(out_ptr + b * stride_out + channels, out.to(out_ptr.dtype.element_ty), mask=mask)


def conv_constants(conv: ConvStep) -> dict:
    """The compile-time constants of a conv: its window's format (prefix CONV), bias, dtypes, width."""
    return dict(**format_constants("CONV", conv.window.fmt), HAS_BIAS=conv.bias is not None,
                ACT=_DTYPES[conv.u.dtype], WDT=_DTYPES[conv.weight.dtype], K=conv.window.shape[-1])


def conv_pointers(conv: ConvStep, unused: torch.Tensor) -> tuple[list, QuantizedTensor, int]:
    """[window data, window scale, new window data, new window scale, u, weight, bias], the new window (a fresh
    tensor: in Mamba2's fused step the B and C windows are read by every program of their group) and u's batch
    stride."""
    window = conv.window
    new = empty_storage(window.fmt, window.shape, window.shape[-1], conv.u.device)
    u = conv.u if conv.u.stride(-1) == 1 else conv.u.contiguous()
    data, scale = window.data.contiguous(), window.scale.contiguous() if window.scale is not None else unused
    pointers = [data, scale, new.data, new.scale if new.scale is not None else unused, u, conv.weight.contiguous(),
                conv.bias if conv.bias is not None else unused]
    return pointers, new, u.stride(0)


def conv_step(conv: ConvStep, *, block: int | None = None, num_warps: int = 4) -> tuple[torch.Tensor, QuantizedTensor]:
    """One decode step's conv in one launch: (output (batch, conv_dim) in ``u``'s dtype, the new stored window).

    Same result as `gsq_hf.kernels.reference.conv_step_reference` (window equal, output within float rounding).
    ``block``: channels per program (default 256). CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    reason = conv_unsupported_reason(conv, "nearest")
    if reason is not None:
        raise NotImplementedError(reason)
    if not conv.u.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("conv_step runs on CUDA tensors (or under TRITON_INTERPRET=1); use "
                           "gsq_hf.kernels.reference.conv_step_reference on CPU")
    batch, conv_dim, _ = conv.window.shape
    if tuple(conv.u.shape) != (batch, conv_dim) or tuple(conv.weight.shape) != tuple(conv.window.shape[1:]):
        raise ValueError(f"conv input {tuple(conv.u.shape)} and weight {tuple(conv.weight.shape)} do not match the "
                         f"window {tuple(conv.window.shape)}: (batch, conv_dim) and (conv_dim, K)")
    out = torch.empty(batch, conv_dim, dtype=conv.u.dtype, device=conv.u.device)
    pointers, new, stride_u = conv_pointers(conv, out)
    block = block or min(256, triton.next_power_of_2(conv_dim))
    _conv_kernel[(triton.cdiv(conv_dim, block), batch)](*pointers, out, conv_dim, stride_u, out.stride(0),
                                                         BLOCK=block, num_warps=num_warps, **conv_constants(conv))
    return out, new

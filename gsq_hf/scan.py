"""Reference recurrences shared by the Mamba families, with a write hook at every stored state.

Glossary (Mamba paper → code):
    x      input of the SSM after the causal conv         ``x``      (B, T, D) or (B, T, H, P)
    Δ      step size, softplus(dt_proj(...) + bias)       ``dt``     (B, T, D) or (B, T, H)
    A      continuous decay rates, -exp(A_log)            ``A``      (D, N) or (H,)
    Ā      discrete decay exp(Δ·A)                        ``dA``     (B, T, D, N) or (B, T, H, 1, 1)
    B̄x     discrete input Δ·B·x                           ``dBx``    (B, T, D, N) or (B, T, H, P, N)
    C      read-out                                       ``C``      (B, T, N, 1) or (B, T, H, N, 1)
    h      the SSM state                                  ``h``      (B, D, N) or (B, H, P, N)
    N      d_state;  D channels (Mamba);  H heads × P head_dim (Mamba2);  K conv kernel width

One step is ``h = Ā·h + B̄x;  y = h·C``. The output of a step uses the fresh state; the state the *next*
step reads is whatever the write hook returns (the stored, possibly quantized, value). This module
imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["causal_conv", "causal_conv_stepwise", "read_out", "selective_scan"]

WriteHook = Callable[[torch.Tensor, int], torch.Tensor]


def selective_scan(
    h: torch.Tensor,
    dA: torch.Tensor,
    dBx: torch.Tensor,
    C: torch.Tensor | None,
    write: WriteHook | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Run the recurrence over ``T`` steps from state ``h``.

    ``write(h, t)`` is called after every step (``every_step``) and returns the state the next step reads;
    with ``write=None`` the state is carried exactly (``end_of_forward`` then writes once). Returns the
    outputs ``(B, T, *h.shape[1:-1])`` (None without a read-out ``C``: a replay of the states only) and the
    final state as carried (None if the hook returned None).
    """
    outputs = []
    for t in range(dBx.shape[1]):
        h = dA[:, t] * h + dBx[:, t]
        if C is not None:
            outputs.append(read_out(h.to(out_dtype), C[:, t]))
        if write is not None:
            h = write(h, t)
    return (torch.stack(outputs, dim=1) if outputs else None), h


def read_out(h: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``y = h·C`` over N: ``h`` (B, *S, N), ``C`` (B, *S[:-1], N, 1) → (B, *S).

    A state laid out state-dim-outer (N before S in memory, as `gsq_hf.step.discretize` makes them on CPU) is
    read as the row-vector product ``Cᵀ·hᵀ`` over its contiguous rows, which BLAS runs much faster than ``h @ C``
    on the transposed view (``scripts/bench_decode_overhead.py`` times the whole step).
    """
    if h.stride(-1) != 1:
        return (C.transpose(-1, -2) @ h.transpose(-1, -2)).squeeze(-2)
    return (h @ C).squeeze(-1)


def causal_conv(
    x: torch.Tensor, previous: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, activation
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv of ``x`` (B, C, T) continuing from the last K inputs ``previous`` (B, C, K).

    Returns the activated output (B, C, T) and the inputs it saw (B, C, K + T): the window after token
    ``t`` is ``full[..., t + 1 : t + 1 + K]``.
    """
    kernel = weight.shape[-1]
    if previous is None:
        previous = x.new_zeros(*x.shape[:2], kernel)
    full = torch.cat([previous.to(x.dtype), x], dim=-1)  # (B, C, K + T)
    out = F.conv1d(full.to(weight.dtype), weight.unsqueeze(1), bias, groups=x.shape[1])[..., -x.shape[-1]:]
    return activation(out).to(x.dtype), full


def causal_conv_stepwise(
    x: torch.Tensor,
    previous: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation,
    write: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same conv one token at a time, storing the window through ``write`` after every token.

    Used when the conv state is stored lossy and every write must be faithful to generation.
    """
    kernel = weight.shape[-1]
    window = x.new_zeros(*x.shape[:2], kernel) if previous is None else previous.to(x.dtype)
    outputs = []
    for t in range(x.shape[-1]):
        window = torch.cat([window[..., 1:], x[..., t : t + 1]], dim=-1)  # (B, C, K)
        value = (window.to(weight.dtype) * weight).sum(-1)
        outputs.append(value + bias if bias is not None else value)
        window = write(window)
    return activation(torch.stack(outputs, dim=-1)).to(x.dtype), window

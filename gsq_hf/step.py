"""One decode step of a Mamba-family layer: its math once, and the one dispatcher between kernels and torch.

An adapter turns its mixer's inputs into the step's SSM inputs (``x, Δ, A, B, C, D, z``; shapes below) and
calls `decode_step` for a single-token forward. `decode_step` runs the fused Triton kernel
(`gsq_hf.kernels.state_update`) where `kernel_reason` is None, else the torch step: `read_state` → `ssm_step`
→ the layer's ``write_ssm`` (`quantize_state` + statistics): the same functions the kernel's torch twin
(`gsq_hf.kernels.state_update_reference`) is made of. A multi-token forward runs `discretize` and
`gsq_hf.scan.selective_scan` with the same write, and `gsq_hf.signals.gate` is the one gate.

The conv before the step: a single token's conv goes through `decode_conv` (the conv kernel
`gsq_hf.kernels.conv_step` where `conv_reason` is None, else the adapter's torch conv). A Mamba2 layer, whose
conv output is x, B and C, hands its conv to `decode_step_conv` instead: conv and state update in one launch
where both reasons are None, else `decode_conv` then `decode_step`. Mamba-1's B, C and Δ are projections of the
whole conv output, so its conv is always a launch of its own before them.

Shapes (leading dims ``L`` = (batch,) for a step, (batch, T) for a scan; S = the state's dims before N)::

                 Mamba-1 (Mamba, FalconMamba, Jamba)   Zamba (multi-head Mamba-1)   Mamba2 and its hybrids
    state        (batch, D, N)                         (batch, H, P, N)             (batch, H, P, N)
    x, z         (*L, D)                               (*L, H, P)                   (*L, H, P), no z
    Δ            (*L, D)                               (*L, H, P)                   (*L, H)
    A            (D, N): a decay per element           (H, P, N)                    (H,): one decay per head
    B, C         (*L, N)                               (*L, H, N)                   (*L, G, N), G groups
    D            (D,)                                  (H, P)                       (H,)
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import GSQConfigError
from .formats import rotate_rows
from .scan import selective_scan
from .signals import gate
from .store import LayerStorage

__all__ = ["conv_reason", "decode_conv", "decode_step", "decode_step_conv", "discretize", "kernel_reason",
           "rotated_basis", "ssm_output", "ssm_step", "unit_gate"]

logger = logging.getLogger(__name__)


def _per_head(A: torch.Tensor) -> bool:
    return A.dim() == 1  # Mamba2: one decay per head; Mamba-1 families: one per state element


def rotated_basis(policy, A: torch.Tensor) -> bool:
    """Whether the torch step keeps the state in the rotated basis (``h @ M`` along N, `gsq_hf.formats.rotate`):
    on Mamba2 with a rotated low format. One decay per head commutes with M (``(a·h + Δ·x·Bᵀ) @ M = a·(h @ M) +
    Δ·x·(B @ M)ᵀ``, and ``h·C = (h @ M)·(C @ M)``, M orthogonal), so a step rotates B and C (N values per group)
    instead of unrotating the read state and rotating the written one ((P·N)×N products per head), as the fused
    kernel does. Mamba-1's decay per state dimension does not commute with a rotation along N."""
    return _per_head(A) and policy.low.rotation is not None


def discretize(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               rotated: bool = False):
    """``(Ā, B̄x, C)`` in `selective_scan`'s layout: Ā = exp(Δ·A) (*L, *S, N) (Mamba2: (*L, H, 1, 1)), B̄x = Δ·B·x
    (*L, *S, N) in fp32, and C as a read-out column (*L, *S[:-1], N, 1) (Mamba2: per head). ``rotated`` (Mamba2
    only, `rotated_basis`): B̄x and C in the rotated basis, for a state kept there."""
    if rotated and not _per_head(A):
        raise ValueError("a state in the rotated basis needs one decay per head (Mamba2); Mamba-1's decay per "
                         "state dimension does not commute with the rotation")
    if _per_head(A):
        if rotated:  # B @ M and C @ M in one call (half the small ops), before they are repeated over the heads
            B, rotated_C = rotate_rows(torch.stack((B.float(), C.float()))).unbind()
            C = rotated_C.to(C.dtype)
        heads = x.shape[-2]
        B = B.repeat_interleave(heads // B.shape[-2], dim=-2)  # (*L, H, N)
        C = C.repeat_interleave(heads // C.shape[-2], dim=-2)
        dA = torch.exp(dt * A)[..., None, None]  # (*L, H, 1, 1)
        xdt = dt[..., None] * x.float()  # (*L, H, P)
        if dt.is_cuda:
            dBx = xdt[..., None] * B[..., None, :].float()  # (*L, H, P, N)
        else:  # the same products laid out state-dim-outer ((*L, H, N, P) in memory), as Mamba-1's below
            dBx = (B.float()[..., None] * xdt[..., None, :]).transpose(-1, -2)
    elif dt.is_cuda:
        dA = torch.exp(dt[..., None] * A)  # (*L, *S, N)
        dBx = dt[..., None] * B[..., None, :].float() * x[..., None].float()
    else:
        dA, dBx = _state_dim_outer(dt, A, B, x)
    return dA, dBx, C[..., None]


def _state_dim_outer(dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, x: torch.Tensor):
    """Mamba-1's Ā and B̄x (*L, *S, N) as the CUDA branch computes them (same products, same order), laid out
    state-dim-outer: N before S in memory, the channels innermost. The states the scan makes then keep that
    layout, and their per-group absmax over N and every elementwise pass of the step run along the long
    contiguous channel dim; over 16 innermost values the absmax is a slow short reduction on CPU, and packing
    sub-byte codes along N becomes whole-row operations (Mamba2 too) (``python scripts/bench_decode_overhead.py``).
    The fused kernel reads contiguous states: CUDA keeps them."""
    lead = dt.dim() - (A.dim() - 1)  # len(L)
    dt_n, x_n = dt.unsqueeze(lead), x.unsqueeze(lead).float()  # (*L, 1, *S)
    dA = torch.exp(dt_n * A.movedim(-1, 0).contiguous())  # (*L, N, *S), contiguous
    dBx = (dt_n * B[..., None, :].float().movedim(-1, lead) * x_n).contiguous()
    return dA.movedim(lead, -1), dBx.movedim(lead, -1)


def ssm_output(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
               A: torch.Tensor) -> torch.Tensor:
    """The output from the read-out ``y`` (like x): the skip ``D·x``, then (Mamba-1) the gate silu(z), in the
    dtypes upstream's slow paths use (Mamba-1 adds the skip in fp32; Mamba2 in y's dtype, and gates later)."""
    if D is not None:
        y = y + x * D[:, None].to(y.dtype) if _per_head(A) else y + x * D.float()
    return y * F.silu(z) if z is not None else y


def ssm_step(state: torch.Tensor | None, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, with_gate: bool, rotated: bool = False):
    """One token from the fp32 ``state`` (None: zeros, before the first write): ``(y, h, gate)``, the output
    (before any Mamba2 norm), the new fp32 state and, ``with_gate``, the units' gate (else None). ``rotated``:
    ``state`` and ``h`` in the rotated basis (`rotated_basis`)."""
    dA, dBx, C = discretize(x, dt, A, B, C, rotated)
    state = torch.zeros_like(dBx) if state is None else state
    y, h = selective_scan(state, dA[:, None], dBx[:, None], C[:, None], None, x.dtype)
    y = ssm_output(y[:, 0], x, D, z, A)
    return y, h, unit_gate(dA, A) if with_gate else None


def unit_gate(dA: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The units' gate (`gsq_hf.signals.gate`) from `discretize`'s Ā (…, *S, N): Mamba2's units are heads (Ā
    (…, H, 1, 1)); Mamba-1's the state's first dim (channels, or Zamba's heads), averaged over the rest."""
    return gate(dA, 2 if _per_head(A) else A.dim() - 1)


# -- the dispatcher ------------------------------------------------------------------------------------------
def kernel_reason(layer, x: torch.Tensor, A: torch.Tensor, z: torch.Tensor | None) -> str | None:
    """Why this decode step of ``layer`` does not run the fused Triton kernel, or None when it does.

    The dispatch rules in one place (docs/design.md explains them): ``GSQConfig.kernel='torch'``; ``'auto'``
    on tensors not on CUDA; a layer with no state yet or holding fp32 fallback units; what the kernel cannot
    store or decide (`gsq_hf.kernels.unsupported_reason`: policy, formats, shapes); triton not
    importable.
    """
    stored = layer.storage
    mode = layer.config.kernel
    reason = _mode_reason(mode, x.is_cuda)
    if reason is not None:
        return reason
    from .kernels.reference import unsupported_reason  # not at the top: the twin there is built from this module

    if stored.fallback is not None:
        return "fp32 fallback units of a non-finite state (only the torch step reads them)"
    reason = unsupported_reason(layer.policy, stored.low, stored.high, A, z, layer.config.group_size)
    if reason is not None:
        return reason
    return None if _kernels(mode, x.is_cuda) is not None else "triton is not importable"


def conv_reason(layer, conv, activation: str) -> str | None:
    """Why the conv of this single-token forward of ``layer`` does not run in Triton, or None when it does.

    ``conv`` is a `gsq_hf.kernels.reference.ConvStep` (the stored window, the token's input, the weights),
    ``activation`` the mixer's (``mixer.activation``). As `kernel_reason` for the mode and triton, and: a cache
    recording scan inputs (`gsq_hf.replay` keeps the torch conv's output); an activation other than SiLU; what
    the conv kernel cannot store (`gsq_hf.kernels.reference.conv_unsupported_reason`: no window yet, e4m3 or
    rotated conv formats, stochastic rounding of a lossy window, a width that is not a power of two).
    """
    cache = layer.cache
    mode = layer.config.kernel
    reason = _mode_reason(mode, conv.u.is_cuda)
    if reason is not None:
        return reason
    if cache.recording_inputs:
        return "the cache records scan inputs (gsq_hf.replay keeps the torch conv's output)"
    if activation not in ("silu", "swish"):
        return f"conv activation {activation!r}: the conv kernel applies SiLU"
    from .kernels.reference import conv_unsupported_reason

    reason = conv_unsupported_reason(conv, layer.config.rounding)
    if reason is not None:
        return reason
    return None if _kernels(mode, conv.u.is_cuda) is not None else "triton is not importable"


def _mode_reason(mode: str, on_cuda: bool) -> str | None:
    if mode == "torch":
        return "GSQConfig.kernel='torch'"
    if mode == "auto" and not on_cuda:
        return "tensors not on CUDA (kernel='auto' runs the kernel on CUDA only)"
    return None


def _kernels(mode: str, on_cuda: bool):
    """The package ``gsq_hf.kernels`` with its Triton modules imported (``.state_update.state_update``,
    ``.conv_step.conv_step``), or None (with a warning) where ``auto`` cannot use them."""
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise GSQConfigError("GSQConfig.kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                             "(set before triton is imported); use kernel='auto' or 'torch' on CPU")
    try:
        from . import kernels
        from .kernels import conv_step, state_update  # noqa: F401  (the Triton modules, as attributes of kernels)
    except ImportError as error:
        if mode == "triton":
            raise GSQConfigError(f"GSQConfig.kernel='triton' needs the triton package ({error}); "
                                 "pip install 'gsq_hf[triton]', or use kernel='torch'") from error
        warnings.warn(f"gsq_hf: triton is not importable ({error}); quantized decode steps on CUDA take the slower "
                      "torch path (pip install 'gsq_hf[triton]')", RuntimeWarning, stacklevel=4)
        return None
    return kernels


def _noted(layer, name: str, reason: str | None, what: str) -> str | None:
    """Keep ``reason`` as ``layer.<name>`` and log it once per cache and reason (INFO)."""
    setattr(layer, name, reason)
    logged = layer.cache.kernel_reasons_logged
    if reason is not None and (what, reason) not in logged:
        logged.add((what, reason))
        logger.info("gsq_hf: %s take the torch path: %s", what, reason)
    return reason


def decode_step(layer, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor | None, z: torch.Tensor | None, conv_history: list | None = None) -> torch.Tensor:
    """One token through ``layer``: update its stored SSM state and return the output (like x; Δ final).

    The kernel where `kernel_reason` is None (a step whose output is NaN/Inf is then redone on torch, which
    keeps such units in fp32; a static cache sets its device flag instead: no host sync), else the torch step;
    the reason is kept as ``layer.kernel_reason`` and logged once per cache and reason (INFO). Same formats,
    decisions and statistics either way; both update a Mamba2 state in the low format's basis (`rotated_basis`).
    """
    reason = _noted(layer, "kernel_reason", kernel_reason(layer, x, A, z), "decode steps")
    y = _kernel_step(layer, x, dt, A, B, C, D, z) if reason is None else None
    if y is None:
        wants_gate, rotated = "gate" in layer.policy.signals, rotated_basis(layer.policy, A)
        y, h, step_gate = ssm_step(layer.read_ssm(rotated), x, dt, A, B, C, D, z, wants_gate, rotated)
        layer.write_ssm(h, step_gate, read_back=False, rotated=rotated)
    if conv_history is not None:
        layer.record_position(conv_history[0])
    return y


def decode_conv(layer, conv, activation: str, torch_conv: Callable[[], tuple]) -> tuple[torch.Tensor, list | None]:
    """The conv of a single-token forward (``conv``: a `gsq_hf.kernels.reference.ConvStep`): the conv kernel where
    `conv_reason` is None (it stores the new window in ``layer``), else ``torch_conv()``, the adapter's torch conv.

    Returns what ``torch_conv`` returns: the output (batch, conv_dim, 1) in the model dtype and, while the cache
    records checkpoints, the stored window after the token (else None).
    """
    reason = _noted(layer, "conv_reason", conv_reason(layer, conv, activation), "decode steps' convs")
    if reason is not None:
        return torch_conv()
    out, window = _kernels(layer.config.kernel, conv.u.is_cuda).conv_step.conv_step(conv)
    layer.store_conv(window, conv.u.dtype)
    return out[..., None], [window] if layer.cache.recording else None


def decode_step_conv(layer, conv, activation: str, torch_conv: Callable[[], tuple],
                     ssm_inputs: Callable[[torch.Tensor], tuple], dt: torch.Tensor, A: torch.Tensor,
                     D: torch.Tensor | None, fuse: bool = True) -> torch.Tensor:
    """One token through a layer whose conv output holds x, B and C (Mamba2's xBC; no z): the output, as
    `decode_step`'s.

    Conv and state update run in one launch (`gsq_hf.kernels.state_update` with ``conv=``) where ``fuse`` (no
    padding mask to apply between them), `conv_reason` and `kernel_reason` are all clear; else `decode_conv`
    (``torch_conv``: the adapter's torch conv), ``ssm_inputs(output (batch, conv_dim))`` → x, B, C, and
    `decode_step`. A fused step whose output is NaN/Inf is redone that way.
    """
    if fuse and _noted(layer, "conv_reason", conv_reason(layer, conv, activation), "decode steps' convs") is None \
            and _noted(layer, "kernel_reason", kernel_reason(layer, conv.u, A, None), "decode steps") is None:
        y = _kernel_step(layer, None, dt, A, None, None, D, None, conv)
        if y is not None:
            return y
    out, history = decode_conv(layer, conv, activation, torch_conv)
    x, B, C = ssm_inputs(out[..., 0])
    return decode_step(layer, x, dt, A, B, C, D, None, history)


def _kernel_step(layer, x, dt, A, B, C, D, z, conv=None) -> torch.Tensor | None:
    """The fused step (stores its copies, and with ``conv`` the new window, in ``layer``), or None when its output
    is not finite (a static cache flags it on the device and keeps the step: `gsq_hf.static_cache`)."""
    cache, stored = layer.cache, layer.storage
    update = _kernels(layer.config.kernel, dt.is_cuda).state_update.state_update(
        stored.low, stored.high, stored.high_valid, x, dt, A, B, C, D, z,
        policy=layer.policy, group_size=layer.config.group_size, rounding=layer.config.rounding,
        seed=layer.config.seed, step=layer.writes, row_signal=cache.row_signal_for(dt.shape[0]),
        return_gate="gate" in layer.policy.signals, inplace=cache.static and _contiguous(stored), conv=conv,
        scale_hold=layer.config.scale_hold,
    )
    finite = torch.isfinite(update.y).all()  # a non-finite state unit makes its row's output non-finite
    if cache.static:
        layer.nonfinite_flag(dt.device).logical_or_(~finite)
    elif not bool(finite):
        return None
    layer.store(LayerStorage(low=update.low, high=update.high, high_valid=update.high_valid), update.gate)
    if conv is not None:
        layer.store_conv(update.conv, conv.u.dtype)
        if cache.recording:
            layer.record_position(update.conv)
    return update.y


def _contiguous(stored: LayerStorage) -> bool:
    """Whether the kernel can write a static cache's buffers in place (it addresses contiguous rows)."""
    return all(t is None or t.is_contiguous()
               for q in (stored.low, stored.high) if q is not None for t in (q.data, q.scale, q.row_scale))

"""The decode-step state update in plain torch: the reference twin of the fused Triton kernel.

`state_update_reference` takes the same arguments as `gsq_hf.kernels.state_update.state_update` (less the
kernel's launch configuration) and computes the same thing from the functions the torch decode path runs
(`gsq_hf.step.decode_step` when the kernel does not apply): `gsq_hf.store.read_state`, `gsq_hf.step.ssm_step`
and `gsq_hf.store.quantize_state`. So it is what CPU users run (``tests/kernels/test_reference.py`` checks
that bit for bit), and the kernel is tested against it (``tests/kernels``). It also takes what only the torch
path stores (budget slots, fp32 fallback units, any format, Zamba's multi-head Mamba-1). This module also
holds what both share: the result type, the supported-case check and the Δ preprocessing. Torch only.

Shapes (Mamba: ``units`` = channels ``D``, no ``P``; Mamba2: ``units`` = heads ``H`` of ``P`` values each)::

    stored state  (batch, D, N) | (batch, H, P, N)   low copy of every unit; high copies where high_valid
    x             (batch, D)    | (batch, H, P)      SSM input after the causal conv
    dt            (batch, D)    | (batch, H)         Δ, or its pre-activation when dt_softplus
    A             (D, N)        | (H,)               continuous decay rates (negative)
    B, C          (batch, N)    | (batch, G, N)      G groups; head h reads group h // (H / G)
    D             (D,)          | (H,)               skip connection
    z             (batch, D)    | —                  output gate silu(z) (Mamba2 gates in its RMS norm)
    y             like x                             output of the step, in x.dtype

(Zamba, torch only: state (batch, H, P, N) with A (H, P, N), x, dt and z (batch, H, P), B, C (batch, H, N).)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import step as ssm
from ..formats import FORMATS, ROTATIONS, SCALE_DTYPES, QuantizedTensor, StateFormat, format_name
from ..policies import PrecisionPolicy
from ..signals import step_signals
from ..store import LayerStorage, quantize_state
from ..store import read_state as read_storage

__all__ = ["KERNEL_FORMATS", "StateUpdate", "check_scale_hold", "delta", "state_update_reference", "unsupported_reason"]

KERNEL_CODES = ("fp32", "bf16", "fp16", "fp8", *(f"{grid}{bits}" for grid in ("int", "midrise")
                                                 for bits in range(2, 9)))
KERNEL_FORMATS = frozenset(
    format_name(codes, scale, rotation)
    for codes in KERNEL_CODES
    for scale in (SCALE_DTYPES if FORMATS[codes].scaled else ("fp32",))
    for rotation in (None, *ROTATIONS)
)  # every code grid above, with any group scale (fp32, fp16, e4m3, e4m3up, e8m0), rotated or not
_SCALE_STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "e4m3": torch.float8_e4m3fn,
                  "e4m3up": torch.float8_e4m3fn, "e8m0": torch.int8}


class StateUpdate(NamedTuple):
    """What one decode step returns: the output and the new stored state."""

    y: torch.Tensor  # like x, in x.dtype
    low: QuantizedTensor  # every unit in policy.low
    high: QuantizedTensor | None  # high copies, current where high_valid (None for static policies)
    high_valid: torch.Tensor | None  # (batch, units) bool, or (batch, K) for budget slots
    gate: torch.Tensor | None  # (batch, units) fp32 gate signal, when return_gate
    slot_units: torch.Tensor | None = None  # (batch, K): the unit of each high slot (budget policies; twin only)
    fallback: torch.Tensor | None = None  # fp32 copies of non-finite units (twin only)
    fallback_mask: torch.Tensor | None = None  # (batch, units)


def unsupported_reason(
    policy: PrecisionPolicy,
    low: QuantizedTensor | None,
    high: QuantizedTensor | None,
    A: torch.Tensor,
    z: torch.Tensor | None,
    group_size: int | None,
) -> str | None:
    """Why the fused step cannot run this case (the caller then keeps the torch path), or None if it can.

    The kernel holds one unit's d_state values in one tile: N and the group size must be powers of two
    (Triton tiles are). Budget policies store high copies in K < units slots chosen by a per-row top-k:
    that stays on the torch path, as does Zamba's multi-head Mamba-1 (A per (head, p, n)).
    """
    if policy.kernel_rule() is None:
        return f"{type(policy).__name__} has no kernel rule: the kernel decides static, gate-threshold and row policies"
    if low is None:
        return "no stored state yet (the first write comes from a prefill, on the torch path)"
    if low.fmt != policy.low or (high is not None and high.fmt != policy.high):
        return "stored formats differ from the policy's (re-store through the cache first)"
    formats = {low.fmt.name} | ({high.fmt.name} if high is not None else set()) | {f.name for f in policy.formats}
    if not formats <= KERNEL_FORMATS:
        return (f"formats {sorted(formats - KERNEL_FORMATS)}: the kernel stores the codes {', '.join(KERNEL_CODES)} "
                f"with any group scale, rotated or not")
    n = low.shape[-1]
    group = group_size or n
    if {3: 2, 4: 1}.get(low.data.dim()) != A.dim():
        return f"state of {low.data.dim()} dims with A of {A.dim()}: only Mamba (B, D, N) and Mamba2 (B, H, P, N)"
    if z is not None and low.data.dim() == 4:
        return "z gate on a Mamba2 state (Mamba2 gates in its RMS norm, after the update)"
    if n < 4 or n & (n - 1) or group & (group - 1) or n % group or group < 2:
        return f"d_state {n} / group size {group}: both must be powers of two, 2 <= group <= d_state, d_state >= 4"
    return None


def check_scale_hold(scale_hold: float) -> None:
    """``scale_hold`` must be in [0, 1), as `GSQConfig.scale_hold` (0: fresh scales)."""
    if isinstance(scale_hold, bool) or not isinstance(scale_hold, (int, float)) or not 0 <= scale_hold < 1:
        raise ValueError(f"scale_hold={scale_hold!r} must be a number in [0, 1) (0: a fresh scale at every write)")


def delta(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float]):
    """Δ in fp32: ``clamp(softplus(dt + dt_bias))``, as Mamba's ``dt_proj`` / Mamba2's ``dt_bias`` paths make it."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(*dt_limit)


def rounding_generator(device: torch.device, seed: int, step: int | torch.Tensor) -> torch.Generator:
    """A generator for stochastic rounding that depends on (seed, step) only, so that each step differs."""
    mixed = (seed * 0x9E3779B97F4A7C15 + int(step)) % (2**63)
    return torch.Generator(device=device).manual_seed(mixed)


def read_state(low: QuantizedTensor, high: QuantizedTensor | None, high_valid: torch.Tensor | None,
               slot_units: torch.Tensor | None = None, fallback: torch.Tensor | None = None,
               fallback_mask: torch.Tensor | None = None, rotated: bool = False) -> torch.Tensor:
    """The fp32 state a reader sees (`gsq_hf.store.read_state`, as `GSQStateLayer.read_ssm`)."""
    return read_storage(LayerStorage(low, high, slot_units, high_valid, fallback, fallback_mask), rotated)


def state_update_reference(
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
    scale_hold: float = 0.0,
    slot_units: torch.Tensor | None = None,
    fallback: torch.Tensor | None = None,
    fallback_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StateUpdate:
    """One decode step on a stored state: read, update in fp32, choose formats, re-quantize, store.

    ``policy`` decides the formats; ``row_signal`` (batch,) is the row signal it reads, if any (None: before
    any logits). Stochastic rounding draws from ``generator``, by default one seeded by ``(seed, step)``. With
    ``inplace`` the new low/high copies are written into the given storage where their shapes agree
    (``high_valid`` is always a new tensor). ``scale_hold`` (`GSQConfig.scale_hold`): the new low copy holds
    the group scales of ``low``, as the layer's write does. ``slot_units`` / ``fallback`` / ``fallback_mask``:
    the rest of a stored state the kernel does not take (`gsq_hf.store`). Shapes: see the module docstring.
    """
    check_scale_hold(scale_hold)
    rotated = ssm.rotated_basis(policy, A)  # a Mamba2 state updated in the low format's basis, as the kernel does
    state = read_state(low, high, high_valid, slot_units, fallback, fallback_mask, rotated)
    dt = delta(dt, dt_bias, dt_softplus, dt_limit)
    y, h, gate = ssm.ssm_step(state, x, dt, A, B, C, D, z, with_gate=True, rotated=rotated)
    batch, units = h.shape[:2]
    if generator is None and rounding == "stochastic":
        generator = rounding_generator(h.device, seed, step)
    signals = step_signals(policy, (batch, units), h.device, gate, row_signal)
    stored = quantize_state(h, policy, signals, group_size or h.shape[-1], rounding, generator, rotated=rotated,
                            previous=LayerStorage(low=low), scale_hold=scale_hold)
    new_low, new_high = stored.low, stored.high
    if inplace:
        new_low = _copy_into(low, new_low)
        if new_high is not None and high is not None and high.shape == new_high.shape:
            new_high = _copy_into(high, new_high)
    return StateUpdate(y.to(x.dtype), new_low, new_high, stored.high_valid, gate if return_gate else None,
                       stored.slot_units, stored.fallback, stored.fallback_mask)


def _copy_into(target: QuantizedTensor, source: QuantizedTensor) -> QuantizedTensor:
    target.data.copy_(source.data)
    for mine, theirs in ((target.scale, source.scale), (target.row_scale, source.row_scale)):
        if mine is not None:
            mine.copy_(theirs)
    return target


def empty_storage(fmt: StateFormat, shape: tuple[int, ...], group_size: int, device) -> QuantizedTensor:
    """Uninitialized storage for an fp32 state of ``shape`` in ``fmt`` (what the kernel writes into)."""
    data_shape = (*shape[:-1], fmt.stored_last_dim(shape[-1]))
    scale = row_scale = None
    if fmt.scaled:
        scale = torch.empty(*shape[:-1], shape[-1] // group_size, dtype=_SCALE_STORAGE[fmt.scale_dtype], device=device)
    if fmt.row_bytes:
        row_scale = torch.empty(shape[0], device=device)
    data = torch.empty(data_shape, dtype=fmt.storage_dtype, device=device)
    return QuantizedTensor(data, scale, fmt, group_size, row_scale)

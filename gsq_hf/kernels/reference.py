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

A decode step's depthwise causal conv (`ConvStep`: kernel width K, SiLU) runs before the SSM step:
`conv_step_reference` is its twin. A Mamba2 step may take it instead of x, B and C (``conv=``): its output is
xBC = [x (H·P) | B (G·N) | C (G·N)] per batch row, split and viewed as the shapes above.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import step as ssm
from ..formats import FORMATS, ROTATIONS, QuantizedTensor, QuasiRandom, StateFormat, format_name
from ..policies import PrecisionPolicy
from ..scan import causal_conv
from ..signals import step_signals
from ..store import LayerStorage, quantize_state
from ..store import read_state as read_storage

__all__ = ["KERNEL_FORMATS", "ConvStep", "StateUpdate", "check_conv", "check_scale_hold", "conv_step_reference",
           "conv_unsupported_reason", "delta", "split_xBC", "state_update_reference", "unsupported_reason",
           "xbc_groups"]

KERNEL_CODES = ("fp32", "bf16", "fp16", "fp8", *(f"{grid}{bits}" for grid in ("int", "midrise")
                                                 for bits in range(2, 9)))
KERNEL_SCALES = ("fp32", "fp16", "e4m3", "e4m3up", "log8", "e8m0")
KERNEL_FORMATS = frozenset(
    format_name(codes, scale, rotation)
    for codes in KERNEL_CODES
    for scale in (KERNEL_SCALES if FORMATS[codes].scaled else ("fp32",))
    for rotation in (None, *ROTATIONS)
)  # every code grid above, with any of those group scales, rotated or not
_SCALE_STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "e4m3": torch.float8_e4m3fn,
                  "e4m3up": torch.float8_e4m3fn, "log8": torch.uint8, "e8m0": torch.int8}


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
    conv: QuantizedTensor | None = None  # the new conv window, when the step ran the conv (``conv=``)


class ConvStep(NamedTuple):
    """One token through a depthwise causal conv of width K with SiLU: a decode step's conv, before its SSM step."""

    window: QuantizedTensor  # (batch, conv_dim, K): the last K conv inputs as stored, in the cache's conv format
    u: torch.Tensor  # (batch, conv_dim): this token's conv input, in the model dtype
    weight: torch.Tensor  # (conv_dim, K)
    bias: torch.Tensor | None  # (conv_dim,)


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
                f"with a group scale of {', '.join(KERNEL_SCALES)}, rotated or not")
    n = low.shape[-1]
    group = group_size or n
    if {3: 2, 4: 1}.get(low.data.dim()) != A.dim():
        return f"state of {low.data.dim()} dims with A of {A.dim()}: only Mamba (B, D, N) and Mamba2 (B, H, P, N)"
    if z is not None and low.data.dim() == 4:
        return "z gate on a Mamba2 state (Mamba2 gates in its RMS norm, after the update)"
    if n < 4 or n & (n - 1) or group & (group - 1) or n % group or group < 2:
        return f"d_state {n} / group size {group}: both must be powers of two, 2 <= group <= d_state, d_state >= 4"
    return None


def conv_unsupported_reason(conv: ConvStep | None, rounding: str) -> str | None:
    """Why the conv kernel cannot run this decode step's conv (the caller then keeps the torch conv), or None.

    The window of one channel is one tile row of K values and one quantization group (`GSQStateLayer.quantize_conv`
    scales it as a whole): K must be a power of two. The conv format must be stored without a second pass or
    state from elsewhere: no e4m3 or log8 group scales (a per-batch-row scale over all channels), no rotation, and no
    stochastic or quasi-random rounding of a lossy window (the torch path draws its thresholds).
    """
    if conv is None or conv.window is None:
        return "no stored conv window yet (the first write comes from a prefill, on the torch path)"
    fmt, kernel = conv.window.fmt, conv.window.shape[-1]
    codes = fmt.name.split("-")[0]
    if codes not in KERNEL_CODES or fmt.rotation is not None or fmt.row_bytes:  # row_bytes: e4m3 / log8 scales
        return (f"conv format {fmt.name}: the conv kernel stores the codes {', '.join(KERNEL_CODES)} with an fp32, "
                "fp16 or e8m0 scale, unrotated")
    if rounding != "nearest" and not fmt.represents(conv.u.dtype):
        return f"{rounding} rounding of a lossy conv window ({fmt.name}) draws its thresholds on the torch path"
    if kernel < 2 or kernel & (kernel - 1):
        return f"conv width {kernel}: the conv kernel needs a power of two"
    dtypes = {conv.u.dtype, conv.weight.dtype} | ({conv.bias.dtype} if conv.bias is not None else set())
    if not dtypes <= {torch.float32, torch.bfloat16, torch.float16}:
        return f"conv dtypes {sorted(map(str, dtypes))}: the conv kernel takes fp32, bf16 and fp16"
    return None


def conv_step_reference(conv: ConvStep, rounding: str = "nearest",
                        generator: torch.Generator | QuasiRandom | None = None
                        ) -> tuple[torch.Tensor, QuantizedTensor]:
    """The conv's output (batch, conv_dim) in ``u``'s dtype and the new stored window: the stored window read in
    the model dtype (`GSQStateLayer.read_conv`), shifted by one with ``u`` appended, conv + SiLU as
    `gsq_hf.scan.causal_conv` computes them, the new window stored in the same format (group = K)."""
    kernel = conv.window.shape[-1]
    previous = conv.window.dequantize().to(conv.u.dtype)
    out, full = causal_conv(conv.u[..., None], previous, conv.weight, conv.bias, F.silu)
    return out[..., 0], conv.window.fmt.quantize(full[..., -kernel:], kernel, rounding, generator)


def xbc_groups(conv_dim: int, heads: int, head_dim: int, d_state: int) -> int:
    """G, the B/C groups of Mamba2's conv channels xBC = [x (H·P) | B (G·N) | C (G·N)]."""
    groups, rest = divmod(conv_dim - heads * head_dim, 2 * d_state)
    if rest or groups < 1 or heads % groups:
        raise ValueError(f"a conv of {conv_dim} channels is not x ({heads}×{head_dim}) + B + C of G groups of "
                         f"{d_state} with G dividing {heads}")
    return groups


def split_xBC(xBC: torch.Tensor, heads: int, head_dim: int, d_state: int) -> tuple[torch.Tensor, ...]:
    """Mamba2's conv output (batch, conv_dim) as the step's x (batch, H, P), B and C (batch, G, N)."""
    batch, conv_dim = xBC.shape
    groups = xbc_groups(conv_dim, heads, head_dim, d_state)
    x, B, C = torch.split(xBC, [heads * head_dim, groups * d_state, groups * d_state], dim=-1)
    return x.view(batch, heads, head_dim), B.view(batch, groups, d_state), C.view(batch, groups, d_state)
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
    slot_units: torch.Tensor | None = None,
    fallback: torch.Tensor | None = None,
    fallback_mask: torch.Tensor | None = None,
    generator: torch.Generator | QuasiRandom | None = None,
) -> StateUpdate:
    """One decode step on a stored state: read, update in fp32, choose formats, re-quantize, store.

    ``policy`` decides the formats; ``row_signal`` (batch,) is the row signal it reads, if any (None: before
    any logits). Stochastic rounding draws from ``generator``, by default one seeded by ``(seed, step)``;
    quasi-random rounding's thresholds are ``QuasiRandom(seed, step)``'s, as the kernel's. With
    ``inplace`` the new low/high copies are written into the given storage where their shapes agree
    (``high_valid`` is always a new tensor). ``scale_hold`` (`GSQConfig.scale_hold`): the new low copy holds
    the group scales of ``low``, as the layer's write does. ``slot_units`` / ``fallback`` / ``fallback_mask``:
    the rest of a stored state the kernel does not take (`gsq_hf.store`). Shapes: see the module docstring.
    ``conv`` (Mamba2 only, x, B and C None): the step first runs its conv (`conv_step_reference`, nearest
    rounding) and takes x, B and C from the output (`split_xBC`); the new window is returned as ``conv``.
    """
    check_scale_hold(scale_hold)
    window = None
    if conv is not None:
        check_conv(conv, low, x, B, C)
        xBC, window = conv_step_reference(conv)
        x, B, C = split_xBC(xBC, *low.shape[1:])
    rotated = ssm.rotated_basis(policy, A)  # a Mamba2 state updated in the low format's basis, as the kernel does
    state = read_state(low, high, high_valid, slot_units, fallback, fallback_mask, rotated)
    dt = delta(dt, dt_bias, dt_softplus, dt_limit)
    y, h, gate = ssm.ssm_step(state, x, dt, A, B, C, D, z, with_gate=True, rotated=rotated)
    batch, units = h.shape[:2]
    if generator is None and rounding == "stochastic":
        generator = rounding_generator(h.device, seed, step)
    elif generator is None and rounding == "quasirandom":
        generator = QuasiRandom(seed, step)
    signals = step_signals(policy, (batch, units), h.device, gate, row_signal)
    stored = quantize_state(h, policy, signals, group_size or h.shape[-1], rounding, generator, rotated=rotated,
                            previous=LayerStorage(low=low), scale_hold=scale_hold)
    new_low, new_high = stored.low, stored.high
    if inplace:
        new_low = _copy_into(low, new_low)
        if new_high is not None and high is not None and high.shape == new_high.shape:
            new_high = _copy_into(high, new_high)
    return StateUpdate(y.to(x.dtype), new_low, new_high, stored.high_valid, gate if return_gate else None,
                       stored.slot_units, stored.fallback, stored.fallback_mask, window)


def check_conv(conv: ConvStep, low: QuantizedTensor, x, B, C) -> None:
    """A step's ``conv=`` goes with a Mamba2 state and no x, B, C (the conv makes them)."""
    if low.data.dim() != 4:
        raise ValueError("conv= is Mamba2's (its conv makes x, B and C); a Mamba-1 step's B, C and Δ come from "
                         "x_proj of the conv's output: run the conv first (gsq_hf.kernels.conv_step)")
    if any(t is not None for t in (x, B, C)):
        raise ValueError("with conv=, pass x, B and C as None: they are the conv's output")
    xbc_groups(conv.u.shape[-1], *low.shape[1:])


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

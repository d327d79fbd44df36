"""How one layer's SSM state is stored: the read and the write of a state, each defined once.

Layout of one SSM layer (``units`` = channels for Mamba, heads for Mamba2)::

    low        (batch, units, *inner)  every unit, in the policy's low format
    high       (batch, K, *inner)      high copies; K = units (threshold policies) or a budget K < units
    slot_units (batch, K)              which unit each high slot holds (None when K == units: slot = unit)
    high_valid (batch, K)              whether the slot holds a current high copy
    fallback   (batch, units, *inner)  fp32 copies of units whose state was NaN/Inf (rare, counted)

A reader takes the high copy where valid, the fallback where set, else the low copy (`read_state`); a writer
asks the policy which units are high and quantizes (`quantize_state`). The cache's layers, the multi-token
scan and the decode step's torch twin all go through these two functions. Torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .formats import QuantizedTensor, QuasiRandom, rotate
from .policies import PrecisionPolicy, Signals

__all__ = ["SSM_FIELDS", "LayerStorage", "quantize_state", "read_state", "select_rows", "write_in_place"]

SSM_FIELDS = ("low", "high", "slot_units", "high_valid", "fallback", "fallback_mask")


@dataclass(frozen=True)
class LayerStorage:
    """Everything one layer stores; immutable so that snapshots are references."""

    low: QuantizedTensor | None = None
    high: QuantizedTensor | None = None
    slot_units: torch.Tensor | None = None
    high_valid: torch.Tensor | None = None
    fallback: torch.Tensor | None = None
    fallback_mask: torch.Tensor | None = None
    conv: QuantizedTensor | None = None

    def map(self, fn) -> LayerStorage:
        """Apply ``fn`` to every tensor (batch indexing along dim 0, device moves)."""

        def apply(value):
            if value is None:
                return None
            return value.map(fn) if isinstance(value, QuantizedTensor) else fn(value)

        return LayerStorage(**{name: apply(getattr(self, name)) for name in self.__dataclass_fields__})

    @property
    def ssm_nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in SSM_FIELDS if getattr(self, name) is not None)

    @property
    def conv_nbytes(self) -> int:
        return self.conv.nbytes if self.conv is not None else 0


def select_rows(storages: list[LayerStorage], index: torch.Tensor) -> LayerStorage:
    """Row ``r`` of ``storages[index[r]]`` for every batch row (``index`` (batch,)): each row's own checkpoint, e.g.
    when the rows of a batch accepted different numbers of speculated tokens. A field some storages lack (the
    fp32 fallback, kept only for non-finite states; everything, in the empty storage before a first write) is
    taken as zeros there: the state of no tokens."""
    rows = torch.arange(index.shape[0], device=index.device)

    def pick(values: list) -> torch.Tensor | QuantizedTensor | None:
        present = next((v for v in values if v is not None), None)
        if present is None:
            return None
        if isinstance(present, QuantizedTensor):
            parts = {name: pick([None if v is None else getattr(v, name) for v in values])
                     for name in ("data", "scale", "row_scale")}
            return QuantizedTensor(parts["data"], parts["scale"], present.fmt, present.group_size, parts["row_scale"])
        stacked = torch.stack([torch.zeros_like(present) if v is None else v for v in values])
        return stacked[index.to(stacked.device), rows.to(stacked.device)]

    fields = LayerStorage.__dataclass_fields__
    return LayerStorage(**{name: pick([getattr(s, name) for s in storages]) for name in fields})


def _tensors(value) -> list[torch.Tensor | None]:
    if isinstance(value, QuantizedTensor):
        return [value.data, value.scale, value.row_scale]
    return [value, None, None]


def write_in_place(current: LayerStorage, new: LayerStorage, fields: tuple[str, ...],
                   where: Callable[[], str]) -> LayerStorage:
    """``current`` with its ``fields`` overwritten in place (``copy_``) by ``new``'s: a static cache's write.

    ``current``'s tensors keep their addresses (a captured CUDA graph replays into them), so ``new`` must have
    the same fields, shapes, dtypes and device; where ``current`` has none of them yet (the first write), clones
    of ``new``'s become the buffers every later write fills. ``where()`` names the layer in the error.
    """
    if all(getattr(current, name) is None for name in fields):
        return replace(current, **{name: _clone(getattr(new, name)) for name in fields})
    for name in fields:
        targets, sources = _tensors(getattr(current, name)), _tensors(getattr(new, name))
        for target, source in zip(targets, sources, strict=True):
            if (target is None) != (source is None) or (
                    target is not None and (target.shape, target.dtype, target.device)
                    != (source.shape, source.dtype, source.device)):
                raise ValueError(
                    f"static GSQCache, {where()}: the stored {name} changed from {_layout(targets)} to "
                    f"{_layout(sources)}; static storage keeps the batch and layout of its first write (call "
                    "cache.reset() to start over, or use the default GSQCache(model, config) for varying batches)")
            if target is not None and target is not source:  # the kernel may have written in place already
                target.copy_(source)
    return current


def _clone(value):
    if value is None:
        return None
    return value.map(torch.clone) if isinstance(value, QuantizedTensor) else value.clone()


def _layout(tensors: list[torch.Tensor | None]) -> str:
    return ", ".join("none" if t is None else f"{tuple(t.shape)} {t.dtype} on {t.device}" for t in tensors)


def _over_inner(mask: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """A (batch, units) mask viewed to broadcast over ``state``'s inner dims."""
    return mask.view(*mask.shape, *([1] * (state.dim() - 2)))


def read_state(s: LayerStorage, rotated: bool = False) -> torch.Tensor | None:
    """The fp32 SSM state ``(batch, units, *inner)`` a reader sees, or None before the first write; ``rotated``:
    in the rotated basis (``state @ M`` along N, `gsq_hf.formats.rotate`), where the Mamba2 torch step keeps it."""
    if s.low is None:
        return None
    state = s.low.dequantize(rotated)
    if s.high is not None and s.high_valid is not None:
        high = s.high.dequantize(rotated)
        valid = _over_inner(s.high_valid, state)
        if s.slot_units is None:
            state = torch.where(valid, high, state)
        else:
            index = s.slot_units.view(valid.shape).expand_as(high)
            state = state.scatter(1, index, torch.where(valid, high, state.gather(1, index)))
    if s.fallback is not None:  # kept unrotated
        state = torch.where(_over_inner(s.fallback_mask, state), rotate(s.fallback) if rotated else s.fallback, state)
    return state


def quantize_state(state: torch.Tensor, policy: PrecisionPolicy, signals: Signals, group: int, rounding: str,
                   generator: torch.Generator | QuasiRandom | None, nonfinite: torch.Tensor | None = None,
                   rotated: bool = False, previous: LayerStorage | None = None,
                   scale_hold: float = 0.0) -> LayerStorage:
    """The stored form of the fp32 state ``(batch, units, *inner)``: every unit in ``policy.low``, the units
    ``policy.choose(signals)`` marks also in ``policy.high`` (in K < units slots for a budget), and fp32 copies
    of units holding NaN/Inf (``fallback_mask`` set: the caller warns and counts them).

    Given ``nonfinite`` (a bool device scalar: a static cache's flag), a NaN/Inf state sets it instead, with no
    host sync and no fp32 copy; the units are stored as they quantize (NaN), for the caller to act on the flag.
    ``rotated``: ``state`` is in the rotated basis (`read_state`); what is stored does not depend on it.
    ``previous`` (the layer's last stored state) and ``scale_hold`` > 0 hold the low copy's group scales
    (`StateFormat.quantize`). ``generator``: stochastic rounding's (a `QuasiRandom`'s stream 0 rounds the low
    copy, stream 1 the high one).
    """
    batch, units = state.shape[:2]
    high_mask = policy.choose(signals)
    low = policy.low.quantize(state, group, rounding, generator, rotated,
                              None if previous is None else previous.low, scale_hold)
    high = slot_units = high_valid = None
    if high_mask is not None:
        if isinstance(generator, QuasiRandom):  # the high copy's thresholds apart from the low copy's
            generator = generator.for_stream(1)
        capacity = policy.high_capacity(units)
        if capacity == units:
            high, high_valid = policy.high.quantize(state, group, rounding, generator, rotated), high_mask
        elif capacity > 0:
            slot_units = high_mask.to(torch.int8).topk(capacity, dim=1, sorted=False).indices
            high_valid = high_mask.gather(1, slot_units)
            index = slot_units.view(batch, capacity, *([1] * (state.dim() - 2))).expand(
                batch, capacity, *state.shape[2:])
            high = policy.high.quantize(state.gather(1, index), group, rounding, generator, rotated)
    fallback = fallback_mask = None
    # fp32 group scales are NaN/Inf exactly when a group is; unscaled formats, and scales stored in fewer bits
    # (fp16 saturates, e4m3 has no Inf, e8m0 is an exponent), need the state. One sum, one host sync:
    # non-finite if any value is (or if the sum overflows: the per-unit check then finds every unit finite),
    # cheaper on the per-token path than an elementwise isfinite
    probe = low.scale if low.scale is not None and low.scale.dtype == torch.float32 else state
    if nonfinite is not None:  # absmax, not the sum: exact (a sum may overflow), and no host sync
        nonfinite.logical_or_(~torch.isfinite(probe.abs().amax()))
    elif not bool(torch.isfinite(probe.sum(dtype=torch.float32))):  # the per-unit check runs only if this fails
        unit_nonfinite = ~torch.isfinite(state).flatten(2).all(dim=-1)  # (batch, units)
        if bool(unit_nonfinite.any()):  # else only the sum overflowed: every unit is finite
            fallback, fallback_mask = rotate(state, inverse=True) if rotated else state.clone(), unit_nonfinite
    return LayerStorage(low=low, high=high, slot_units=slot_units, high_valid=high_valid, fallback=fallback,
                        fallback_mask=fallback_mask)

"""The state layers of a `GSQCache`: one Mamba layer's conv + SSM state, stored per the cache's policy.

Each write goes through `gsq_hf.store` (`quantize_state`, `read_state`) and is counted here (unit writes per
format, stored bits, bytes a step moves) and, while tracing, logged. Storage tensors are replaced, never written
in place, so a snapshot is a set of references; a static cache (``GSQCache(..., static=True)``) instead copies
every write into the buffers of its first (`gsq_hf.store.write_in_place`), counts on the device in place and
flags NaN/Inf states on the device (``nonfinite``) instead of keeping fp32 copies: what a CUDA graph can replay.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicLayer, LinearAttentionAndFullAttentionLayer, LinearAttentionLayer

from .formats import QuantizedTensor, QuasiRandom, StateFormat, get_format
from .store import SSM_FIELDS, LayerStorage, quantize_state, read_state, write_in_place

if TYPE_CHECKING:
    from .cache import GSQCache

__all__ = ["FALLBACK", "GSQHybridStateLayer", "GSQStateLayer"]

FALLBACK = "fp32_fallback"


class _GSQStateMixin:
    """One Mamba layer's conv + SSM state in the cache, quantized on every write.

    Mixed into transformers' linear-attention layer classes so that ``isinstance`` checks in transformers
    (sequence length, masks, ``has_previous_state``) keep working; hybrid layers keep their KV cache.
    """

    def __init__(self, cache: GSQCache, layer_idx: int):
        super().__init__(number_of_states=1)
        self._cache = cache
        # this layer's config and policy: the cache's, with its `GSQConfig.layer_overrides` entry if any
        self.config = cache.config.for_layer(layer_idx)
        self.policy = cache.policy if self.config is cache.config else self.config.build_policy()
        self.storage = LayerStorage()
        self.positions: list[LayerStorage] = []  # per-token checkpoints while the cache records
        self.step_inputs: list[dict] = []  # per forward, its per-token scan inputs while recording (gsq_hf.replay)
        self.replay_start: LayerStorage | None = None  # the state when it began recording them
        self.last_gate: torch.Tensor | None = None  # the signal of the last write, to re-quantize a copy
        self.kernel_reason: str | None = None  # why the last decode step did not run the kernel (gsq_hf.step)
        self.conv_reason: str | None = None  # why the last decode step's conv did not run in Triton (gsq_hf.step)
        self.nonfinite: torch.Tensor | None = None  # static cache: bool device flag, set by a NaN/Inf state write
        self.tracing = 0  # precision trace: 0 off, 1 high fraction per row, 2 also every unit's format id
        self.trace_high: list[torch.Tensor] = []  # per write: (batch,) fraction of units stored high
        self.trace_units: list[torch.Tensor] = []  # per write: (batch, units) int8 format id (tracing == 2)
        self._reset_stats()

    # -- statistics ------------------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        formats = self.policy.formats
        self.unit_writes: dict[str, torch.Tensor | int] = {f.name: 0 for f in formats} | {FALLBACK: 0}
        self.stored_bits = 0.0  # sum over writes of bits stored (payload + scales), as a tensor once written
        self.stored_elements = 0
        self.writes = 0  # SSM writes so far: the step counter of the fused kernel's stochastic rounding
        self.last_step_bytes: torch.Tensor | int = 0
        self._last_unit_bytes: torch.Tensor | int = 0
        self.ssm_shape: tuple[int, ...] | None = None
        self.conv_shape: tuple[int, ...] | None = None
        self.conv_dtype: torch.dtype | None = None

    def _device_counters(self, device: torch.device) -> None:
        """A static cache counts in int64 device scalars added to in place: a captured graph replays the adds."""
        self.unit_writes = {name: torch.zeros((), dtype=torch.int64, device=device) for name in self.unit_writes}
        self.stored_bits, self.stored_elements, self.writes, self.last_step_bytes, self._last_unit_bytes = (
            torch.zeros((), dtype=torch.int64, device=device) for _ in range(5))

    @property
    def cache(self) -> GSQCache:
        return self._cache

    def group_size(self, d_state: int) -> int:
        return self.config.group_size or d_state

    def conv_format(self, dtype: torch.dtype) -> StateFormat:
        return get_format(dtype if self.config.conv_format == "auto" else self.config.conv_format)

    def generator(self, device: torch.device, stream: int = 0) -> torch.Generator | QuasiRandom | None:
        """Where this layer's rounding is stochastic, the cache's seeded generator; quasi-random, this write's
        thresholds (the write count steps them; ``stream`` 2: the conv window's); else None."""
        if self.config.rounding == "quasirandom":
            return QuasiRandom(self.config.seed, self.writes, stream)
        return self._cache.generator(device) if self.config.rounding == "stochastic" else None

    def _keep(self, new: LayerStorage, fields: tuple[str, ...]) -> None:
        """Make ``new``'s ``fields`` the stored ones: by reference, or (static cache) copied into the buffers."""
        if self._cache.static:
            self.storage = write_in_place(self.storage, new, fields, lambda: f"layer {self._cache.layer_index(self)}")
        else:
            self.storage = new

    # -- reading ---------------------------------------------------------------------------------------
    @property
    def has_state(self) -> bool:
        return self.storage.low is not None

    def read_ssm(self, rotated: bool = False) -> torch.Tensor | None:
        """The fp32 SSM state ``(batch, units, *inner)`` a reader sees, or None before the first write; ``rotated``:
        in the rotated basis (`gsq_hf.store.read_state`)."""
        return read_state(self.storage, rotated)

    def read_conv(self) -> torch.Tensor | None:
        """The conv state ``(batch, conv_dim, kernel)`` in the model dtype, or None before the first write."""
        if self.storage.conv is None:
            return None
        return self.storage.conv.dequantize().to(self.conv_dtype)

    # -- writing ---------------------------------------------------------------------------------------
    def quantize_conv(self, conv_state: torch.Tensor) -> QuantizedTensor:
        """The stored form of a conv window ``(batch, conv_dim, kernel)``."""
        fmt = self.conv_format(conv_state.dtype)
        return fmt.quantize(conv_state, conv_state.shape[-1], self.config.rounding,
                            self.generator(conv_state.device, stream=2))

    def write_conv(self, conv_state: torch.Tensor) -> torch.Tensor:
        """Store the conv window; returns what a reader will see (in the model dtype)."""
        stored = self.quantize_conv(conv_state)
        self.store_conv(stored, conv_state.dtype)
        return conv_state if stored.fmt.represents(conv_state.dtype) else stored.dequantize().to(conv_state.dtype)

    def store_conv(self, stored: QuantizedTensor, dtype: torch.dtype) -> None:
        """Keep a stored conv window (`quantize_conv`'s, or the conv kernel's), read back in ``dtype``."""
        self.conv_dtype = dtype
        self.conv_shape = tuple(stored.shape)
        self._keep(replace(self.storage, conv=stored), ("conv",))
        self.has_previous_state[0] = True

    def record_position(self, conv: QuantizedTensor) -> None:
        """Checkpoint the state after one token (SSM as stored now, conv window as of that token)."""
        self.positions.append(replace(self.storage, conv=conv))

    def write_ssm(self, state: torch.Tensor, gate: torch.Tensor | None, read_back: bool = True,
                  rotated: bool = False) -> torch.Tensor | None:
        """Store the fp32 state ``(batch, units, *inner)`` (``rotated``: given in the rotated basis,
        `gsq_hf.store.quantize_state`); ``gate`` is ``(batch, units)`` (None if unused).

        Returns the state a reader will now see (the dequantized stored value, in ``state``'s basis) when
        ``read_back``.
        """
        cache = self._cache
        signals = cache.signals(self.policy, tuple(state.shape[:2]), state.device, gate)
        stored = quantize_state(state, self.policy, signals,
                                self.group_size(state.shape[-1]), self.config.rounding, self.generator(state.device),
                                self.nonfinite_flag(state.device) if cache.static else None, rotated,
                                self.storage, self.config.scale_hold)
        self.store(stored, gate)
        return self.read_ssm(rotated) if read_back else None

    def store(self, stored: LayerStorage, gate: torch.Tensor | None) -> None:
        """Keep a stored SSM state (`quantize_state`'s, or the fused kernel's copies; the conv window stays) and
        count it; warns when it holds fp32 fallback units."""
        if stored.fallback_mask is not None:
            warnings.warn(
                f"gsq_hf: non-finite SSM state in layer {self._cache.layer_index(self)}; those units are kept in "
                "fp32 (counted as 'nonfinite_unit_writes' in memory_report()).",
                RuntimeWarning,
                stacklevel=3,
            )
        if self._cache.static and not torch.is_tensor(self.writes):  # the first write of a static cache
            self._device_counters(stored.low.data.device)
        self._keep(replace(stored, conv=self.storage.conv), SSM_FIELDS)
        self._written(stored.low.shape, stored.low.group_size, gate, stored.slot_units, stored.high_valid,
                      stored.fallback_mask, stored.low.data.device)

    def nonfinite_flag(self, device: torch.device) -> torch.Tensor:
        """The static cache's device flag this layer's writes set on a NaN/Inf state (allocated on first use)."""
        if self.nonfinite is None:
            self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        return self.nonfinite

    def _written(self, shape, group, gate, slot_units, high_valid, fallback_mask, device) -> None:
        self.has_previous_state[0] = True
        self.last_gate = gate
        self.writes += 1
        self._count(shape, group, high_valid, fallback_mask)
        if self.tracing:
            self._trace(shape[0], shape[1], slot_units, high_valid, fallback_mask, device)

    def _trace(self, batch, units, slot_units, high_valid, fallback_mask, device) -> None:
        """Log which format each unit of this write is read from (opt-in; kept on ``device``: no host sync)."""
        ids = torch.zeros(batch, units, dtype=torch.int8, device=device)  # 0 low
        if high_valid is not None:
            high = high_valid if slot_units is None else torch.zeros(
                batch, units, dtype=torch.bool, device=device).scatter(1, slot_units, high_valid)
            ids = ids.masked_fill(high, 1)  # 1 high
        if fallback_mask is not None:
            ids = ids.masked_fill(fallback_mask, 2)  # 2 fp32 fallback (a reader takes it over a high copy)
        self.trace_high.append((ids == 1).float().mean(dim=1))
        if self.tracing == 2:
            self.trace_units.append(ids)

    def _count(self, shape, group, high_valid, fallback_mask) -> None:
        """Accumulate write statistics as device tensors (no host sync on the hot path)."""
        policy = self.policy
        batch, units = shape[:2]
        unit_elems = math.prod(shape[2:])
        total = batch * units
        n_high = high_valid.sum() if high_valid is not None else 0
        n_fallback = fallback_mask.sum() if fallback_mask is not None else 0
        n_low = total - n_high - n_fallback
        counts = {policy.low.name: n_low, FALLBACK: n_fallback}
        if policy.high is not None:
            counts[policy.high.name] = n_high
        per_unit_bytes = {f.name: f.nbytes(unit_elems, group) for f in policy.formats} | {FALLBACK: 4 * unit_elems}
        # once per batch row and stored tensor: e4m3 scales' second-level scale (StateFormat.row_bytes)
        row_bytes = batch * (policy.low.row_bytes + (policy.high.row_bytes if high_valid is not None else 0))
        written = sum(counts[name] * per_unit_bytes[name] for name in counts) + row_bytes
        bits = written * 8
        previous_bytes = self._last_unit_bytes if self.ssm_shape == shape else 0
        self.ssm_shape = shape
        if self._cache.static:  # in place on the device counters (`_device_counters`)
            for name, count in counts.items():
                self.unit_writes[name].add_(count)
            self.stored_bits.add_(bits)
            self.stored_elements.add_(total * unit_elems)
            self.last_step_bytes.fill_(previous_bytes + written)
            self._last_unit_bytes.fill_(written)
            return
        for name, count in counts.items():
            self.unit_writes[name] = self.unit_writes[name] + count
        self.stored_bits = self.stored_bits + bits
        self.stored_elements += total * unit_elems
        self.last_step_bytes = previous_bytes + written
        self._last_unit_bytes = written

    # -- transformers cache-layer protocol -------------------------------------------------------------
    def lazy_initialization(self, *args, **kwargs) -> None:  # storage is created on the first write
        pass

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        raise RuntimeError("GSQStateLayer is written by gsq_hf's patched mixers; use gsq_hf.patch(model) first.")

    update_recurrent_state = update_conv_state

    @property
    def batch_size(self) -> int:
        return self.storage.low.data.shape[0] if self.storage.low is not None else -1

    def _map_storage(self, fn) -> None:
        if self._cache.static:  # beam reordering keeps the buffers; a new batch size or device cannot
            self._keep(self.storage.map(fn), (*SSM_FIELDS, "conv"))
            return
        self.storage = self.storage.map(fn)
        self.positions = [p.map(fn) for p in self.positions]

    def reset(self) -> None:
        self.storage = LayerStorage()
        self.nonfinite = None
        self.positions = []
        self.step_inputs, self.replay_start = [], None
        self.trace_high, self.trace_units = [], []
        self._reset_stats()
        super().reset()  # has_previous_state, and the KV part of a hybrid layer

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_storage(lambda t: t.index_select(0, beam_idx.to(t.device)))
        super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_storage(lambda t: t[indices])
        if isinstance(self, DynamicLayer):
            DynamicLayer.batch_select_indices(self, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_storage(lambda t: t.repeat_interleave(repeats, dim=0))
        if isinstance(self, DynamicLayer):
            DynamicLayer.batch_repeat_interleave(self, repeats)

    def offload(self) -> None:
        self._map_storage(lambda t: t.to("cpu", non_blocking=True))
        super().offload()

    def prefetch(self) -> None:
        if self.device is not None:
            self._map_storage(lambda t: t.to(self.device, non_blocking=True))
        super().prefetch()

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(
            "a recurrent state cannot be cropped; record per-token checkpoints with cache.record_positions() "
            "and roll back with cache.rollback(num_tokens)."
        )

    # -- snapshots -------------------------------------------------------------------------------------
    @property
    def io_bytes(self) -> int:
        """Bytes one read or one write of the state as stored now moves, SSM (each unit in its own format, as the
        last write stored it) + conv: a decode step reads the previous state and writes this one."""
        return int(self._last_unit_bytes) + self.storage.conv_nbytes

    def memory(self) -> dict[str, Any]:
        s = self.storage
        full_ssm = 4 * math.prod(self.ssm_shape) if self.ssm_shape else 0
        full_conv = (torch.finfo(self.conv_dtype).bits // 8) * math.prod(self.conv_shape) if self.conv_shape else 0
        return {
            "ssm_state_bytes": s.ssm_nbytes,
            "conv_state_bytes": s.conv_nbytes,
            "full_precision_ssm_state_bytes": full_ssm,
            "full_precision_conv_state_bytes": full_conv,
            "state_bytes_per_step": int(self.last_step_bytes) + 2 * s.conv_nbytes,
        }


class GSQStateLayer(_GSQStateMixin, LinearAttentionLayer):
    """A Mamba layer's state (pure Mamba models, and Mamba layers of hybrids)."""


class GSQHybridStateLayer(_GSQStateMixin, LinearAttentionAndFullAttentionLayer):
    """A layer holding a Mamba state and an attention KV cache (Zamba, FalconH1): the KV part is untouched."""

    def lazy_initialization(self, *args, **kwargs) -> None:  # only the KV part initializes lazily here
        if len(args) == 2 and not kwargs:
            DynamicLayer.lazy_initialization(self, *args)


_GSQ_LAYER_FOR = {LinearAttentionLayer: GSQStateLayer, LinearAttentionAndFullAttentionLayer: GSQHybridStateLayer}

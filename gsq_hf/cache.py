"""`GSQCache`: a transformers cache whose SSM and conv states are stored in the formats a policy picks.

Layout of one SSM layer (``units`` = channels for Mamba, heads for Mamba2)::

    low        (batch, units, *inner)  every unit, in the policy's low format
    high       (batch, K, *inner)      high copies; K = units (threshold policies) or a budget K < units
    slot_units (batch, K)              which unit each high slot holds (None when K == units: slot = unit)
    high_valid (batch, K)              whether the slot holds a current high copy
    fallback   (batch, units, *inner)  fp32 copies of units whose state was NaN/Inf (rare, counted)

A reader takes the high copy where valid, the fallback where set, else the low copy. Storage tensors are
replaced, never written in place, so a snapshot of the cache is a set of references (cheap checkpoints
for rollback, e.g. speculative decoding). Attention layers of hybrid models keep transformers' ordinary
dynamic layers.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers.cache_utils import (
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionLayer,
)

from .config import GSQConfig, resolve_config
from .formats import QuantizedTensor, StateFormat, get_format
from .policies import Signals
from .signals import ROW_SIGNALS

__all__ = ["GSQCache", "GSQHybridStateLayer", "GSQStateLayer", "LayerStorage", "weight_bytes"]

FALLBACK = "fp32_fallback"


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
        parts = (self.low, self.high, self.slot_units, self.high_valid, self.fallback, self.fallback_mask)
        return sum(p.nbytes for p in parts if p is not None)

    @property
    def conv_nbytes(self) -> int:
        return self.conv.nbytes if self.conv is not None else 0


class _GSQStateMixin:
    """One Mamba layer's conv + SSM state in the cache, quantized on every write.

    Mixed into transformers' linear-attention layer classes so that ``isinstance`` checks in transformers
    (sequence length, masks, ``has_previous_state``) keep working; hybrid layers keep their KV cache.
    """

    def __init__(self, cache: GSQCache):
        super().__init__(number_of_states=1)
        self._cache = cache
        self.storage = LayerStorage()
        self.positions: list[LayerStorage] = []  # per-token checkpoints while the cache records
        self.last_gate: torch.Tensor | None = None  # the signal of the last write, to re-quantize a copy
        self.tracing = 0  # precision trace: 0 off, 1 high fraction per row, 2 also every unit's format id
        self.trace_high: list[torch.Tensor] = []  # per write: (batch,) fraction of units stored high
        self.trace_units: list[torch.Tensor] = []  # per write: (batch, units) int8 format id (tracing == 2)
        self._reset_stats()

    # -- statistics ------------------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        formats = self._cache.policy.formats
        self.unit_writes: dict[str, torch.Tensor | int] = {f.name: 0 for f in formats} | {FALLBACK: 0}
        self.stored_bits = 0.0  # sum over writes of bits stored (payload + scales), as a tensor once written
        self.stored_elements = 0
        self.writes = 0  # SSM writes so far: the step counter of the fused kernel's stochastic rounding
        self.last_step_bytes: torch.Tensor | int = 0
        self._last_unit_bytes: torch.Tensor | int = 0
        self.ssm_shape: tuple[int, ...] | None = None
        self.conv_shape: tuple[int, ...] | None = None
        self.conv_dtype: torch.dtype | None = None

    @property
    def cache(self) -> GSQCache:
        return self._cache

    # -- reading ---------------------------------------------------------------------------------------
    @property
    def has_state(self) -> bool:
        return self.storage.low is not None

    def read_ssm(self) -> torch.Tensor | None:
        """The fp32 SSM state ``(batch, units, *inner)`` a reader sees, or None before the first write."""
        s = self.storage
        if s.low is None:
            return None
        state = s.low.dequantize()
        if s.high is not None:
            high = s.high.dequantize()
            valid = s.high_valid.view(*s.high_valid.shape, *([1] * (state.dim() - 2)))
            if s.slot_units is None:
                state = torch.where(valid, high, state)
            else:
                index = s.slot_units.view(valid.shape).expand_as(high)
                state = state.scatter(1, index, torch.where(valid, high, state.gather(1, index)))
        if s.fallback is not None:
            state = torch.where(s.fallback_mask.view(*s.fallback_mask.shape, *([1] * (state.dim() - 2))),
                                s.fallback, state)
        return state

    def read_conv(self) -> torch.Tensor | None:
        """The conv state ``(batch, conv_dim, kernel)`` in the model dtype, or None before the first write."""
        if self.storage.conv is None:
            return None
        return self.storage.conv.dequantize().to(self.conv_dtype)

    # -- writing ---------------------------------------------------------------------------------------
    def quantize_conv(self, conv_state: torch.Tensor) -> QuantizedTensor:
        """The stored form of a conv window ``(batch, conv_dim, kernel)``."""
        fmt = self._cache.conv_format(conv_state.dtype)
        return fmt.quantize(conv_state, conv_state.shape[-1], self._cache.config.rounding,
                            self._cache.generator(conv_state.device))

    def write_conv(self, conv_state: torch.Tensor) -> torch.Tensor:
        """Store the conv window; returns what a reader will see (in the model dtype)."""
        self.conv_dtype = conv_state.dtype
        self.conv_shape = tuple(conv_state.shape)
        stored = self.quantize_conv(conv_state)
        self.storage = replace(self.storage, conv=stored)
        self.has_previous_state[0] = True
        return conv_state if stored.fmt.represents(conv_state.dtype) else stored.dequantize().to(conv_state.dtype)

    def record_position(self, conv: QuantizedTensor) -> None:
        """Checkpoint the state after one token (SSM as stored now, conv window as of that token)."""
        self.positions.append(replace(self.storage, conv=conv))

    def write_ssm(self, state: torch.Tensor, gate: torch.Tensor | None, read_back: bool = True) -> torch.Tensor | None:
        """Store the fp32 state ``(batch, units, *inner)``; ``gate`` is ``(batch, units)`` (None if unused).

        Returns the state a reader will now see (the dequantized stored value) when ``read_back``.
        """
        cache, policy = self._cache, self._cache.policy
        batch, units = state.shape[:2]
        group = cache.group_size(state.shape[-1])
        generator = cache.generator(state.device)
        rounding = cache.config.rounding
        high_mask = policy.choose(cache.signals((batch, units), state.device, gate))

        low = policy.low.quantize(state, group, rounding, generator)
        high = slot_units = high_valid = None
        if high_mask is not None:
            capacity = policy.high_capacity(units)
            if capacity == units:
                high, high_valid = policy.high.quantize(state, group, rounding, generator), high_mask
            elif capacity > 0:
                slot_units = high_mask.to(torch.int8).topk(capacity, dim=1, sorted=False).indices
                high_valid = high_mask.gather(1, slot_units)
                index = slot_units.view(batch, capacity, *([1] * (state.dim() - 2))).expand(
                    batch, capacity, *state.shape[2:])
                high = policy.high.quantize(state.gather(1, index), group, rounding, generator)
        fallback = fallback_mask = None
        # fp32 group scales are NaN/Inf exactly when a group is; unscaled formats, and scales stored in fewer bits
        # (fp16 saturates, e4m3 has no Inf, e8m0 is an exponent), need the state. One sum, one host sync:
        # non-finite if any value is (or if the sum overflows: the per-unit check then finds every unit finite),
        # cheaper on the per-token path than an elementwise isfinite
        probe = low.scale if low.scale is not None and low.scale.dtype == torch.float32 else state
        if not bool(torch.isfinite(probe.sum(dtype=torch.float32))):  # the per-unit check runs only if this fails
            nonfinite = ~torch.isfinite(state).flatten(2).all(dim=-1)  # (batch, units)
            if bool(nonfinite.any()):  # else only the sum overflowed: every unit is finite
                fallback, fallback_mask = state.clone(), nonfinite
        if fallback_mask is not None:
            warnings.warn(
                f"gsq_hf: non-finite SSM state in layer {cache.layer_index(self)}; those units are kept in fp32 "
                "(counted as 'nonfinite_unit_writes' in memory_report()).",
                RuntimeWarning,
                stacklevel=2,
            )
        self.storage = replace(self.storage, low=low, high=high, slot_units=slot_units, high_valid=high_valid,
                               fallback=fallback, fallback_mask=fallback_mask)
        self._written(tuple(state.shape), group, gate, slot_units, high_valid, fallback_mask, state.device)
        return self.read_ssm() if read_back else None

    def store_update(self, low: QuantizedTensor, high: QuantizedTensor | None, high_valid: torch.Tensor | None,
                     gate: torch.Tensor | None) -> None:
        """Store a decode step the fused kernel computed (`gsq_hf.kernels.state_update`): same statistics as
        `write_ssm`; the caller has checked the step's output for NaN/Inf (else it takes the torch path)."""
        self.storage = replace(self.storage, low=low, high=high, slot_units=None, high_valid=high_valid,
                               fallback=None, fallback_mask=None)
        shape = low.shape
        self._written(shape, low.group_size, gate, None, high_valid, None, low.data.device)

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
        policy = self._cache.policy
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
        for name, count in counts.items():
            self.unit_writes[name] = self.unit_writes[name] + count
        self.stored_bits = self.stored_bits + bits
        self.stored_elements += total * unit_elems
        self.last_step_bytes = previous_bytes + written
        self._last_unit_bytes = written
        self.ssm_shape = shape

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
        self.storage = self.storage.map(fn)
        self.positions = [p.map(fn) for p in self.positions]

    def reset(self) -> None:
        self.storage = LayerStorage()
        self.positions = []
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


def _pad_stack(per_layer: list[list[torch.Tensor]], shape: tuple[int, ...], fill, dtype) -> torch.Tensor:
    """``(layers, *shape)`` on the CPU from per-layer lists of per-write tensors, padded with ``fill``."""
    out = torch.full((len(per_layer), *shape), fill, dtype=dtype)
    for i, rows in enumerate(per_layer):
        if rows and all(r.shape == rows[0].shape for r in rows):  # the usual case: one copy per layer
            out[i, : len(rows)][(slice(None), *(slice(0, n) for n in rows[0].shape))] = torch.stack(rows).to(
                "cpu", dtype)
        else:
            for t, row in enumerate(rows):
                out[i, t][tuple(slice(0, n) for n in row.shape)] = row.to("cpu", dtype)
    return out


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers as stored (``model.get_memory_footprint()`` for a transformers
    model: int8 weights count 1 byte, bitsandbytes 4-bit weights half a byte; offloaded weights count too)."""
    if hasattr(model, "get_memory_footprint"):
        return int(model.get_memory_footprint())
    return sum(t.nelement() * t.element_size() for t in (*model.parameters(), *model.buffers()))


class GSQCache(DynamicCache):
    """A `DynamicCache` whose Mamba-layer states are stored per a `GSQConfig`.

    Patched models build one automatically (in ``forward`` and ``generate``); build one yourself to give
    two caches different state configs over the same weights::

        cache = GSQCache(model, "int4")             # or GSQCache(model.config, "int4")
        model(input_ids, cache=cache)
        model.generate(input_ids, cache=GSQCache(model, "int8"))   # a per-call config (past_key_values= too)

    Given the model (not only its config), `memory_report` also counts the model's weights
    (``weight_bytes``, ``total_bytes``): weights plus states is the real memory budget.

    ``trace=True`` (or ``cache.start_trace()``) logs, at every SSM state write, the fraction of each row's
    units stored in the high format (``trace="units"``: also every unit's format); read it back with
    `precision_trace`. Off by default: the write path then costs one ``if``.
    """

    def __init__(self, model_or_config, gsq_config: GSQConfig | str | dict | None = "fp32", *,
                 trace: bool | str = False, **kwargs):
        model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
        super().__init__(config=model.config if model is not None else model_or_config, **kwargs)
        self._model = weakref.ref(model) if model is not None else None  # weights for memory_report; no cycle
        self.config = resolve_config(gsq_config).for_model_type(getattr(self.config_of(model_or_config),
                                                                        "model_type", None))
        self.policy = self.config.build_policy()
        self._row_signal_name = next(iter(sorted(self.policy.signals & ROW_SIGNALS.keys())), None)
        self.recording = False
        self.row_signal: torch.Tensor | None = None  # (batch,) normalized entropy/surprisal of the next write
        self._prev_logprobs: torch.Tensor | None = None
        self._generators: dict[str, torch.Generator] = {}
        for index, layer in enumerate(self.layers):
            if type(layer) in _GSQ_LAYER_FOR:
                self.layers[index] = _GSQ_LAYER_FOR[type(layer)](self)
        if trace:
            self.start_trace(units=trace == "units")

    @staticmethod
    def config_of(model_or_config):
        """The transformers config of a model, or the config itself."""
        return model_or_config.config if isinstance(model_or_config, torch.nn.Module) else model_or_config

    # -- used by the adapters --------------------------------------------------------------------------
    def gsq_layer(self, layer_idx: int) -> _GSQStateMixin:
        layer = self.layers[layer_idx]
        if not isinstance(layer, _GSQStateMixin):
            raise TypeError(f"cache layer {layer_idx} is a {type(layer).__name__}, not a GSQ state layer")
        return layer

    def layer_index(self, layer: _GSQStateMixin) -> int:
        return next(i for i, candidate in enumerate(self.layers) if candidate is layer)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator for stochastic rounding on ``device`` (None for round-to-nearest)."""
        if self.config.rounding != "stochastic":
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generators[key]

    def group_size(self, d_state: int) -> int:
        return self.config.group_size or d_state

    def conv_format(self, dtype: torch.dtype) -> StateFormat:
        return get_format(dtype if self.config.conv_format == "auto" else self.config.conv_format)

    def row_signal_for(self, batch: int) -> torch.Tensor | None:
        signal = self.row_signal
        return signal if signal is not None and signal.shape[0] == batch else None

    def signals(self, shape: tuple[int, int], device: torch.device, gate: torch.Tensor | None) -> Signals:
        """What the policy reads at a write of ``shape`` (batch, units): the step's gate, the row signal."""
        values = {} if gate is None else {"gate": gate}
        row = self.row_signal_for(shape[0])
        if row is not None:
            values[self._row_signal_name] = row
        return Signals(shape, device, values)

    @property
    def wants_logits(self) -> bool:
        """Whether the policy reads a signal from the model's next-token distribution (`gsq_hf.signals`)."""
        return self._row_signal_name is not None

    def begin_forward(self, input_ids: torch.Tensor | None) -> None:
        """Turn the previous step's log-probs into the signal of the tokens now absorbed (surprisal)."""
        if not self.wants_logits or not ROW_SIGNALS[self._row_signal_name].needs_token:
            return
        logprobs = self._prev_logprobs
        if logprobs is None or input_ids is None or logprobs.shape[0] != input_ids.shape[0]:
            return
        token = input_ids[:, :1].to(logprobs.device)
        self.row_signal = ROW_SIGNALS[self._row_signal_name].compute(logprobs, token)

    def observe_logits(self, logits: torch.Tensor) -> None:
        """Record the signal the next write will see from the last position's logits ``(batch, vocab)``."""
        if not self.wants_logits:
            return
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        signal = ROW_SIGNALS[self._row_signal_name]
        if signal.needs_token:
            self._prev_logprobs = logprobs
        else:
            self.row_signal = signal.compute(logprobs, None)

    # -- beam search, batching, reset ------------------------------------------------------------------
    def _map_rows(self, fn) -> None:
        if self.row_signal is not None:
            self.row_signal = fn(self.row_signal)
        if self._prev_logprobs is not None:
            self._prev_logprobs = fn(self._prev_logprobs)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_rows(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        super().reset()
        self.row_signal = self._prev_logprobs = None
        self._generators.clear()

    @property
    def is_compileable(self) -> bool:
        return False

    # -- checkpoints -----------------------------------------------------------------------------------
    @property
    def gsq_layers(self) -> list[_GSQStateMixin]:
        return [layer for layer in self.layers if isinstance(layer, _GSQStateMixin)]

    def attention_layers(self) -> list[DynamicLayer]:
        return [layer for layer in self.layers if isinstance(layer, DynamicLayer)]

    def snapshot(self) -> dict[str, Any]:
        """References to the current states: restoring them later undoes every write since."""
        return {"layers": [layer.storage for layer in self.gsq_layers], "row_signal": self.row_signal,
                "prev_logprobs": self._prev_logprobs,
                "kv_lengths": [layer.get_seq_length() for layer in self.attention_layers()]}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Return to a `snapshot`; attention layers drop the KV entries written since."""
        for layer, storage in zip(self.gsq_layers, snapshot["layers"], strict=True):
            layer.storage = storage
            layer.has_previous_state[0] = storage.low is not None
        for layer, length in zip(self.attention_layers(), snapshot["kv_lengths"], strict=True):
            if layer.get_seq_length() > length:
                DynamicLayer.crop(layer, length - layer.get_seq_length())
        self.row_signal, self._prev_logprobs = snapshot["row_signal"], snapshot["prev_logprobs"]

    def record_positions(self, enabled: bool = True) -> None:
        """Keep a checkpoint after every token written (``every_step`` mode) until ``rollback``/disable."""
        if enabled and self.config.write_mode != "every_step":
            raise ValueError("per-token checkpoints need write_mode='every_step' (a state is stored after each token)")
        self.recording = enabled
        for layer in self.gsq_layers:
            layer.positions = []

    def rollback(self, num_tokens: int) -> None:
        """Restore the state after the first ``num_tokens`` tokens written since recording started.

        Attention layers of a hybrid model drop the KV entries of the tokens rolled back.
        """
        layers = self.gsq_layers
        recorded = len(layers[0].positions) if layers else 0
        if not 1 <= num_tokens <= recorded:
            raise ValueError(f"can roll back to 1..{recorded} recorded tokens, not {num_tokens}")
        for layer in layers:
            layer.storage = layer.positions[num_tokens - 1]
            layer.positions = layer.positions[:num_tokens]
        if num_tokens < recorded:
            for layer in self.attention_layers():
                if layer.is_initialized:
                    DynamicLayer.crop(layer, num_tokens - recorded)

    def load_states(self, source: GSQCache) -> None:
        """Take ``source``'s current states, re-stored in this cache's formats (e.g. a draft synced to its target).

        Attention KV entries of hybrid models are shared by reference (updates concatenate into new tensors).
        """
        for mine, theirs in zip(self.gsq_layers, source.gsq_layers, strict=True):
            state, conv = theirs.read_ssm(), theirs.read_conv()
            if state is None:
                continue
            gate = None
            if "gate" in self.policy.signals:  # the source's last signal, else our own, else "closed" (first sync)
                gate = next((g for g in (theirs.last_gate, mine.last_gate) if g is not None), None)
                gate = gate if gate is not None else state.new_zeros(state.shape[:2])
            mine.write_ssm(state, gate, read_back=False)
            mine.write_conv(conv)
        for mine, theirs in zip(self.attention_layers(), source.attention_layers(), strict=True):
            mine.keys, mine.values, mine.is_initialized = theirs.keys, theirs.values, theirs.is_initialized
            mine.dtype, mine.device = getattr(theirs, "dtype", None), getattr(theirs, "device", None)
        self.row_signal, self._prev_logprobs = source.row_signal, source._prev_logprobs

    # -- precision trace -------------------------------------------------------------------------------
    def start_trace(self, units: bool = False) -> None:
        """Log the precision of every SSM state write from now on (clears an earlier log).

        Per write, layer and batch row: the fraction of units (channels / heads) a reader takes from the high
        format; with ``units=True`` also each unit's format id (0 low, 1 high, 2 fp32 fallback). The log stays on
        the states' device until `precision_trace` (no host sync per write); it is a log of writes, so
        ``rollback``/``restore`` do not shorten it and beam reordering does not permute it.
        """
        for layer in self.gsq_layers:
            layer.tracing = 2 if units else 1
            layer.trace_high, layer.trace_units = [], []

    def stop_trace(self) -> None:
        """Stop logging; what was logged stays readable with `precision_trace`."""
        for layer in self.gsq_layers:
            layer.tracing = 0

    @property
    def tracing(self) -> bool:
        return any(layer.tracing for layer in self.gsq_layers)

    def precision_trace(self) -> dict[str, Any]:
        """The precision log since `start_trace`, as CPU tensors (what `gsq_hf.plot.precision_trace` draws).

        Returns a dict:

        - ``high_fraction``: float32 ``(layers, writes, batch)``, the fraction of each row's units stored in the
          high format at each write (0 throughout for a static policy). With ``write_mode="every_step"`` a write
          is a token: starting from an empty cache, write ``t`` is the state after input token ``t``. NaN pads
          layers or writes with fewer entries (e.g. the batch shrank).
        - ``unit_formats``: int8 ``(layers, writes, batch, units)`` format ids (-1 pads), or None when not
          traced with ``units=True``; ``format_ids``: the name of each id (``low``, ``high``, fp32 fallback).
        - ``layers``: the model layer index of each row; ``config``, ``policy``, ``low_format``,
          ``high_format`` (None for a static policy).
        """
        layers = [(index, layer) for index, layer in enumerate(self.layers) if isinstance(layer, _GSQStateMixin)]
        if not any(layer.tracing or layer.trace_high for _, layer in layers):
            raise RuntimeError("no precision trace: build the cache with GSQCache(..., trace=True) or call "
                               "cache.start_trace() before the forward calls")
        writes = max((len(layer.trace_high) for _, layer in layers), default=0)
        batch = max((t.shape[0] for _, layer in layers for t in layer.trace_high), default=0)
        high = _pad_stack([layer.trace_high for _, layer in layers], (writes, batch), math.nan, torch.float32)
        unit_formats = None
        if any(layer.trace_units for _, layer in layers):
            units = max(u.shape[1] for _, layer in layers for u in layer.trace_units)
            unit_formats = _pad_stack([layer.trace_units for _, layer in layers], (writes, batch, units), -1,
                                      torch.int8)
        low_name, high_name = self.policy.low.name, self.policy.high.name if self.policy.high else None
        return {
            "high_fraction": high,
            "unit_formats": unit_formats,
            "format_ids": {0: low_name, 1: high_name, 2: FALLBACK},
            "layers": [index for index, _ in layers],
            "config": self.config.name,
            "policy": self.config.policy.kind,
            "low_format": low_name,
            "high_format": high_name,
        }

    # -- report ----------------------------------------------------------------------------------------
    @property
    def attention_kv_bytes(self) -> int:
        """Bytes of the keys and values the attention layers (or attention parts of hybrid layers) hold now."""
        return sum(
            layer.keys.nbytes + layer.values.nbytes
            for layer in self.layers
            if isinstance(layer, CacheLayerMixin) and layer.is_initialized
        )

    def memory_report(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """What the state cache holds now and over the run (a JSON-serializable dict).

        ``weight_bytes`` is ``model``'s weights as stored (`weight_bytes`; the model this cache was built
        with when none is given, None when it was built from a config) and ``total_bytes`` the weights plus
        ``state_bytes`` plus ``attention_kv_bytes``: what this batch needs in all.

        ``full_precision_*`` is what transformers' own cache holds for the same batch: SSM states in fp32
        (as upstream keeps them even for bf16 models), conv states in the model dtype.
        ``state_bytes_per_step`` is the SSM + conv bytes a decode step reads and writes when each unit is
        touched only in its own format (what a fused kernel moves), for the last write of each layer.
        ``attention_kv_bytes`` is what the attention layers of a hybrid model hold beside the states (their
        keys and values, kept by transformers as usual; 0 for pure Mamba models): not part of ``state_bytes``.
        """
        layers = self.gsq_layers
        per_layer = [layer.memory() for layer in layers]
        totals = {key: sum(m[key] for m in per_layer) for key in (per_layer[0] if per_layer else {})}
        writes: dict[str, float] = {}
        for layer in layers:
            for name, count in layer.unit_writes.items():
                writes[name] = writes.get(name, 0) + float(count)
        total_writes = sum(writes.values())
        elements = sum(layer.stored_elements for layer in layers)
        bits = sum(float(layer.stored_bits) for layer in layers)
        ssm = totals.get("ssm_state_bytes", 0)
        conv = totals.get("conv_state_bytes", 0)
        full_ssm = totals.get("full_precision_ssm_state_bytes", 0)
        full_conv = totals.get("full_precision_conv_state_bytes", 0)
        model = model if model is not None else (self._model() if self._model is not None else None)
        weights = weight_bytes(model) if model is not None else None
        return {
            "config": self.config.name,
            "policy": repr(self.policy),
            "batch_size": next((layer.batch_size for layer in layers if layer.batch_size > 0), 0),
            "state_bytes": ssm + conv,
            "full_precision_state_bytes": full_ssm + full_conv,
            "ssm_state_bytes": ssm,
            "full_precision_ssm_state_bytes": full_ssm,
            "conv_state_bytes": conv,
            "full_precision_conv_state_bytes": full_conv,
            "avg_state_bits": bits / elements if elements else 0.0,
            "format_fractions": {k: (v / total_writes if total_writes else 0.0) for k, v in writes.items()},
            "nonfinite_unit_writes": int(writes.get(FALLBACK, 0)),
            "state_bytes_per_step": totals.get("state_bytes_per_step", 0),
            "attention_kv_bytes": self.attention_kv_bytes,
            "weight_bytes": weights,
            "total_bytes": None if weights is None else weights + ssm + conv + self.attention_kv_bytes,
            "layers": per_layer,
        }

"""`GSQCache`: a transformers cache whose SSM and conv states are stored in the formats a policy picks.

Its Mamba layers are `GSQStateLayer`s (`gsq_hf.state_layer`; the layout of what one stores: `gsq_hf.store`);
the cache holds what they share: the config and policy, the row signals of the next write, the generators of
stochastic rounding, checkpoints, the precision trace and the memory report. Storage tensors are replaced,
never written in place, so a snapshot of the cache is a set of references (cheap checkpoints for rollback,
e.g. speculative decoding); a static cache (``static=True``) writes in place instead (`gsq_hf.state_layer`).
Attention layers of hybrid models keep transformers' ordinary dynamic layers.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer

from .config import GSQConfig, resolve_config
from .errors import GSQConfigError, UnsupportedModelError
from .policies import PrecisionPolicy, Signals
from .replay import recorded_tokens, replay, step_inputs_nbytes
from .signals import ROW_SIGNALS, step_signals
from .state_layer import _GSQ_LAYER_FOR, FALLBACK, GSQHybridStateLayer, GSQStateLayer, _GSQStateMixin
from .static_cache import StaticCacheMixin
from .store import LayerStorage, select_rows

__all__ = ["FALLBACK", "GSQCache", "GSQHybridStateLayer", "GSQStateLayer", "LayerStorage", "weight_bytes"]


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


class GSQCache(StaticCacheMixin, DynamicCache):
    """A `DynamicCache` whose Mamba-layer states are stored per a `GSQConfig`.

    Patched models build one automatically (in ``forward`` and ``generate``); build one yourself to give
    two caches different state configs over the same weights::

        cache = GSQCache(model, "int4")             # or GSQCache(model.config, "int4")
        model(input_ids, cache=cache)
        model.generate(input_ids, cache=GSQCache(model, "int8"))   # a per-call config (past_key_values= too)

    With no ``gsq_config``, the config the model is patched with (``model.config.gsq_config``), else fp32 (lossless).
    Given the model (not only its config), `memory_report` also counts the model's weights
    (``weight_bytes``, ``total_bytes``): weights plus states is the real memory budget.

    ``trace=True`` (or ``cache.start_trace()``) logs, at every SSM state write, the fraction of each row's
    units stored in the high format (``trace="units"``: also every unit's format); read it back with
    `precision_trace`. Off by default: the write path then costs one ``if``.

    ``static=True`` keeps each layer's storage in buffers allocated at its first write (for that batch) and
    written in place, with no host sync per layer: what `gsq_hf.generate_graph` captures in a CUDA graph. Same
    stored bytes and logits as the default; no checkpoints (they would alias the buffers) and no fp32 copies of
    NaN/Inf units: such a write sets a device flag instead, which `check_finite` reads (a patched model's
    forward does, unless ``defer_finite_check``; docs/design.md).
    """

    def __init__(self, model_or_config, gsq_config: GSQConfig | str | dict | None = None, *,
                 trace: bool | str = False, static: bool = False, **kwargs):
        model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
        super().__init__(config=model.config if model is not None else model_or_config, **kwargs)
        self._model = weakref.ref(model) if model is not None else None  # weights for memory_report; no cycle
        model_config = self.config_of(model_or_config)
        if gsq_config is None:
            gsq_config = getattr(model_config, "gsq_config", None) or "fp32"
        self.config = resolve_config(gsq_config).for_model_type(getattr(model_config, "model_type", None))
        self.policy = self.config.build_policy()  # every layer's but those of `GSQConfig.layer_overrides`
        self.static = static
        self.recording = False  # per-token checkpoints (record_positions)
        self.recording_inputs = False  # per-token scan inputs (record_inputs)
        self.row_signal: torch.Tensor | None = None  # (batch,) normalized entropy/surprisal of the next write
        self._prev_logprobs: torch.Tensor | None = None
        self._generators: dict[str, torch.Generator] = {}
        self.kernel_reasons_logged: set[tuple[str, str]] = set()  # gsq_hf.step logs each (what, reason) once
        for index, layer in enumerate(self.layers):
            if type(layer) in _GSQ_LAYER_FOR:
                self.layers[index] = _GSQ_LAYER_FOR[type(layer)](self, index)
        if not self.gsq_layers:
            raise UnsupportedModelError(f"GSQCache: a {getattr(model_config, 'model_type', None) or 'model'} config "
                                        "has no Mamba state layer to store (only Mamba-family models and their "
                                        "hybrids have one; gsq_hf.patch lists the supported families)")
        if trace not in (False, True, "units"):
            raise ValueError(f"trace must be False, True or 'units' (every unit's format too), got {trace!r}")
        self.config.check_layer_indices(
            [i for i, layer in enumerate(self.layers) if isinstance(layer, _GSQStateMixin)], "this model")
        row_signals = sorted(set().union(*(layer.policy.signals for layer in self.gsq_layers), self.policy.signals)
                             & ROW_SIGNALS.keys())
        if len(row_signals) > 1:
            raise GSQConfigError(f"GSQConfig.layer_overrides: the layers' policies read different next-token signals "
                                 f"({', '.join(row_signals)}); a cache computes one")
        self._row_signal_name = next(iter(row_signals), None)
        if trace:
            self.start_trace(units=trace == "units")

    def __getstate__(self) -> dict:
        """Pickled (``torch.save``) without the model: a weak reference does not pickle, and the weights are the
        model's to save. ``memory_report(model=...)`` counts them after loading."""
        return {**self.__dict__, "_model": None}

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

    def generator(self, device: torch.device) -> torch.Generator:
        """The seeded generator for stochastic rounding on ``device`` (one stream per device, shared by the
        layers that round stochastically)."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generators[key]

    def row_signal_for(self, batch: int) -> torch.Tensor | None:
        signal = self.row_signal
        return signal if signal is not None and signal.shape[0] == batch else None

    def signals(self, policy: PrecisionPolicy, shape: tuple[int, int], device: torch.device,
                gate: torch.Tensor | None) -> Signals:
        """What ``policy`` reads at a write of ``shape`` (batch, units): the step's gate, the row signal."""
        return step_signals(policy, shape, device, gate, self.row_signal_for(shape[0]))

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
        self._set_rows("row_signal", ROW_SIGNALS[self._row_signal_name].compute(logprobs, token))

    def observe_logits(self, logits: torch.Tensor) -> None:
        """Record the signal the next write will see from the last position's logits ``(batch, vocab)``."""
        if not self.wants_logits:
            return
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        signal = ROW_SIGNALS[self._row_signal_name]
        self._set_rows("_prev_logprobs" if signal.needs_token else "row_signal",
                       logprobs if signal.needs_token else signal.compute(logprobs, None))

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
        self._refuse_static("a snapshot")
        return {"layers": [layer.storage for layer in self.gsq_layers], "row_signal": self.row_signal,
                "prev_logprobs": self._prev_logprobs,
                "kv_lengths": [layer.get_seq_length() for layer in self.attention_layers()]}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Return to a `snapshot`; attention layers drop the KV entries written since."""
        self._refuse_static("restore")
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
        if enabled:
            self._refuse_static("record_positions")
        self.recording = enabled
        for layer in self.gsq_layers:
            layer.positions = []

    def rollback(self, num_tokens: int | torch.Tensor) -> None:
        """Restore the state after the first ``num_tokens`` tokens written since recording started (an int, or
        (batch,) counts: each row its own checkpoint).

        Attention layers of a hybrid model drop the KV entries of the tokens rolled back; with per-row counts each
        row's kept entries move right by ``max(num_tokens) - num_tokens[r]``: extend the row's left padding in the
        attention mask by as much (and pass its own ``position_ids``).
        """
        layers = self.gsq_layers
        recorded = len(layers[0].positions) if layers else 0
        most = self._check_counts(num_tokens, recorded, "roll back to")
        uniform = not torch.is_tensor(num_tokens) or bool((num_tokens == most).all())
        for layer in layers:
            if uniform:
                layer.storage = layer.positions[most - 1]
            else:
                layer.storage = select_rows(layer.positions, num_tokens.to(torch.long) - 1)
            layer.positions = layer.positions[:most]
        self._crop_attention(num_tokens, recorded)

    def _check_counts(self, num_tokens: int | torch.Tensor, recorded: int, what: str) -> int:
        """The largest of ``num_tokens`` (an int or per-row counts) after checking each is in 1..recorded."""
        counts = num_tokens if torch.is_tensor(num_tokens) else torch.tensor([num_tokens])
        low, most = int(counts.min()), int(counts.max())
        if not 1 <= low <= most <= recorded:
            raise ValueError(f"can {what} 1..{recorded} recorded tokens, not {num_tokens if low == most else counts}"
                             + ("" if what != "replay" else " (record_inputs() first; only multi-token forwards are "
                                "recorded)"))
        return most

    @property
    def has_attention_kv(self) -> bool:
        """Whether some layers hold attention keys and values (a hybrid model: a rollback per row shifts them)."""
        return any(not isinstance(layer, GSQStateLayer) for layer in self.layers)

    def _crop_attention(self, num_tokens: int | torch.Tensor, recorded: int) -> None:
        """Keep the KV entries of the first ``num_tokens`` of the last ``recorded`` tokens, per-row counts
        right-aligned (row r moved right by ``max - num_tokens[r]``, its first entries then padding)."""
        most = int(num_tokens.max()) if torch.is_tensor(num_tokens) else num_tokens
        for layer in self.attention_layers():
            if not layer.is_initialized or layer.keys.numel() == 0:
                continue
            if most < recorded:
                DynamicLayer.crop(layer, most - recorded)
            if torch.is_tensor(num_tokens) and bool((num_tokens != most).any()):
                shift = (most - num_tokens).to(layer.keys.device)
                source = (torch.arange(layer.keys.shape[-2], device=shift.device) - shift[:, None]).clamp_min(0)
                index = source[:, None, :, None].expand_as(layer.keys)
                layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)

    def record_inputs(self, enabled: bool = True) -> None:
        """Keep the per-token scan inputs of multi-token forwards (not states) until `replay`/disable.

        The replay-rollback counterpart of `record_positions` (`gsq_hf.replay`): a few values per channel and
        token instead of a whole state per token.
        """
        if enabled and self.config.write_mode != "every_step":
            raise ValueError("replay needs write_mode='every_step' (a state is stored after each token)")
        if enabled:
            self._refuse_static("record_inputs")
        self.recording_inputs = enabled
        for layer in self.gsq_layers:
            layer.step_inputs, layer.replay_start = [], (layer.storage if enabled else None)

    def replay(self, num_tokens: int | torch.Tensor) -> None:
        """Go to the state after the first ``num_tokens`` tokens since `record_inputs` (an int, or (batch,) counts:
        each row its own): from the state then, the kept inputs of those tokens are re-run through the recurrence
        (no weights are read).

        Attention layers of a hybrid model drop the KV entries of the tokens after them (per-row counts: as in
        `rollback`).
        """
        layers = self.gsq_layers
        recorded = min((recorded_tokens(layer) for layer in layers), default=0) if self.recording_inputs else 0
        self._check_counts(num_tokens, recorded, "replay")
        for layer in layers:
            replay(layer, layer.replay_start, num_tokens)
        self._crop_attention(num_tokens, recorded)

    @property
    def recorded_input_bytes(self) -> int:
        """Bytes of the per-token scan inputs kept since `record_inputs` (the replay buffer)."""
        return sum(step_inputs_nbytes(layer) for layer in self.gsq_layers)

    def load_states(self, source: GSQCache) -> None:
        """Take ``source``'s current states, re-stored in this cache's formats (e.g. a draft synced to its target).

        Attention KV entries of hybrid models are shared by reference (updates concatenate into new tensors).
        """
        for mine, theirs in zip(self.gsq_layers, source.gsq_layers, strict=True):
            state, conv = theirs.read_ssm(), theirs.read_conv()
            if state is None:
                continue
            gate = None
            if "gate" in mine.policy.signals:  # the source's last signal, else our own, else "closed" (first sync)
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
          ``high_format`` (None for a static policy); ``layer_formats``: each row's (low, high) format names,
          which differ from those where `GSQConfig.layer_overrides` sets a layer's policy.
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
            "layer_formats": [(layer.policy.low.name, layer.policy.high.name if layer.policy.high else None)
                              for _, layer in layers],
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
        elements = sum(int(layer.stored_elements) for layer in layers)
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

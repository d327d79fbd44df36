"""What a static `GSQCache` (``static=True``) adds to the cache: in-place row signals, its NaN/Inf flags, and
the refusal of what would alias its buffers.

A static cache's layers write into buffers allocated at their first write (`gsq_hf.store.write_in_place`) and
keep no fp32 copies of NaN/Inf units; a write that meets one sets the layer's device flag
(`gsq_hf.store.quantize_state`), read here once per check instead of once per layer and token. A patched
model's forward checks after every forward; `gsq_hf.generate_graph` defers the check to every few steps and
redoes a flagged run with the default cache (docs/design.md).
"""

from __future__ import annotations

import torch

from .state_layer import _GSQStateMixin

__all__ = ["StaticCacheMixin"]


class StaticCacheMixin:
    """Mixed into `GSQCache`; ``self.static`` switches it on."""

    static: bool = False
    defer_finite_check: bool = False  # True while a caller (generate_graph) reads the flags itself

    def _set_rows(self, name: str, value: torch.Tensor) -> None:
        """Set a per-row signal tensor; a static cache copies into the one it has (a CUDA graph reads that one)."""
        current = getattr(self, name)
        if self.static and current is not None and current.shape == value.shape:
            current.copy_(value)
        else:
            setattr(self, name, value)

    def _refuse_static(self, what: str) -> None:
        if self.static:
            raise ValueError(f"{what} keeps references to stored states, which a static GSQCache overwrites in "
                             "place; use the default GSQCache(model, config) (static=False)")

    def nonfinite_layers(self) -> list[int]:
        """Model layer indices whose writes to this static cache met a NaN/Inf state (one host sync)."""
        flagged = [(index, layer.nonfinite) for index, layer in enumerate(self.layers)
                   if isinstance(layer, _GSQStateMixin) and layer.nonfinite is not None]
        if not flagged:
            return []
        device = flagged[0][1].device
        hits = torch.stack([flag.to(device) for _, flag in flagged]).tolist()
        return [index for (index, _), hit in zip(flagged, hits, strict=True) if hit]

    def check_finite(self) -> None:
        """Raise `FloatingPointError` naming the layers where this static cache stored a NaN/Inf state."""
        layers = self.nonfinite_layers()
        if layers:
            raise FloatingPointError(
                f"gsq_hf: non-finite SSM state in layer(s) {layers} of a static GSQCache, which keeps no fp32 copies "
                "of such units: outputs from then on are invalid. Run this input with the default GSQCache (it keeps "
                "them in fp32), or through gsq_hf.generate_graph, which redoes such a run by itself")

"""Zamba2's Mamba layers: one in every layer; hybrid layers add a shared attention block whose KV cache
shares the cache layer (`GSQHybridStateLayer`).

The mixer is `Mamba2Mixer` under another name (same sub-modules, same math: gated RMS norm, Δ clamped to
``time_step_limit``), so the adapter only lists its class. State (B, H, P, N), one decision per head.
"""

from __future__ import annotations

from .base import register_adapter
from .mamba2 import Mamba2Adapter

__all__ = ["Zamba2Adapter"]


@register_adapter
class Zamba2Adapter(Mamba2Adapter):
    family = "zamba2"
    mixer_classes = ("Zamba2MambaMixer",)

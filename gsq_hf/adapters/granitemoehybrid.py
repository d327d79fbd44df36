"""GraniteMoeHybrid's Mamba layers (attention layers in between keep transformers' KV cache).

The mixer is `Mamba2Mixer` under another name (same sub-modules, same math: gated RMS norm, Δ clamped to
``time_step_limit``), so the adapter only lists its class. State (B, H, P, N), one decision per head.
"""

from __future__ import annotations

from .base import register_adapter
from .mamba2 import Mamba2Adapter

__all__ = ["GraniteMoeHybridAdapter"]


@register_adapter
class GraniteMoeHybridAdapter(Mamba2Adapter):
    family = "granitemoehybrid"
    mixer_classes = ("GraniteMoeHybridMambaLayer",)

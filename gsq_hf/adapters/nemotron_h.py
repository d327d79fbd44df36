"""NemotronH's Mamba layers (attention, MLP and MoE blocks in between; only the attention ones hold a KV cache).

The mixer is `Mamba2Mixer` under another name (same sub-modules, same math: gated RMS norm, Δ clamped to
``time_step_limit``), so the adapter only lists its class. State (B, H, P, N), one decision per head.
"""

from __future__ import annotations

from .base import register_adapter
from .mamba2 import Mamba2Adapter

__all__ = ["NemotronHAdapter"]


@register_adapter
class NemotronHAdapter(Mamba2Adapter):
    family = "nemotron_h"
    mixer_classes = ("NemotronHMamba2Mixer",)

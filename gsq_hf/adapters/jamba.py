"""Jamba's Mamba layers: mathematically FalconMamba's mixer (RMS norms on time_step, B, C), with learned norm weights.

Jamba's ``dt_layernorm`` / ``b_layernorm`` / ``c_layernorm`` carry weights where FalconMamba's are weightless;
both are the mixer's own modules, so the adapter only lists the class. The attention layers between them keep
transformers' KV cache (reported as ``attention_kv_bytes``).
"""

from __future__ import annotations

from .base import register_adapter
from .falcon_mamba import FalconMambaAdapter

__all__ = ["JambaAdapter"]


@register_adapter
class JambaAdapter(FalconMambaAdapter):
    family = "jamba"
    mixer_classes = ("JambaMambaMixer",)

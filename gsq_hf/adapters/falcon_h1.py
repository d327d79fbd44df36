"""FalconH1's Mamba heads: Mamba2 with µP multipliers and an optional gated norm (state (B, H, P, N), per head).

FalconH1 runs attention and Mamba side by side in every layer, so each cache layer holds a Mamba state and a KV
cache (`GSQHybridStateLayer`; the KV part is transformers'). The mixer differs from Mamba2 only around the SSM:
its input is scaled by ``ssm_in_multiplier`` and ``in_proj``'s output by the ``mup_vector`` buffer, and the
output is gated by ``norm(y, z)`` only when ``mamba_rms_norm`` (otherwise ``y * silu(z)``, no norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_adapter
from .mamba2 import Mamba2Adapter

__all__ = ["FalconH1Adapter"]


@register_adapter
class FalconH1Adapter(Mamba2Adapter):
    family = "falcon_h1"
    mixer_classes = ("FalconH1Mixer",)

    def in_projection(self, mixer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return mixer.in_proj(hidden_states * mixer.ssm_in_multiplier) * mixer.mup_vector

    def gated_output(self, mixer: nn.Module, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return mixer.norm(y, z) if mixer.mamba_rms_norm else y * F.silu(z)

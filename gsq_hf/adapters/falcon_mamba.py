"""FalconMamba: Mamba-1 with RMS norms on time_step, B and C after ``x_proj`` (state (B, D, N), per channel).

Everything else, the gate included, is `MambaAdapter`'s; only the selection step differs. The norms are the
mixer's own (weightless) ``dt_layernorm`` / ``b_layernorm`` / ``c_layernorm`` modules, called as upstream does.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import register_adapter
from .mamba import MambaAdapter

__all__ = ["FalconMambaAdapter"]


@register_adapter
class FalconMambaAdapter(MambaAdapter):
    family = "falcon_mamba"
    mixer_classes = ("FalconMambaMixer",)

    def selection(self, mixer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        time_step, B, C = super().selection(mixer, x)
        return mixer.dt_layernorm(time_step), mixer.b_layernorm(B), mixer.c_layernorm(C)

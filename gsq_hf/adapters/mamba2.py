"""Mamba2 mixers: state (B, H, P, N), one policy decision per head.

Gate of a head: ``1 - exp(Δ·A)``: Mamba2's decay is one scalar per head, so no reduction is needed.
Quantization groups run along N within one (head, p) row; ``GSQConfig.group_size`` splits N further.

Mamba2-style mixers of the hybrids (Zamba2, Bamba, NemotronH, GraniteMoeHybrid) are this mixer under other
names; FalconH1 overrides `in_projection` / `gated_output` for its multipliers and optional norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import GSQStateLayer
from ..step import decode_step
from .base import MixerAdapter, apply_padding_mask, register_adapter

__all__ = ["Mamba2Adapter"]


@register_adapter
class Mamba2Adapter(MixerAdapter):
    family = "mamba2"
    mixer_classes = ("Mamba2Mixer",)
    unit = "head"

    def d_state(self, mixer: nn.Module) -> int:
        return mixer.ssm_state_size

    def in_projection(self, mixer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """``in_proj``'s output (B, T, D + conv_dim + H): z, then x·B·C (through the conv), then Δ."""
        return mixer.in_proj(hidden_states)

    def gated_output(self, mixer: nn.Module, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The SSM output ``y`` (B, T, D) gated by ``z`` (B, T, D): Mamba2's gated RMS norm."""
        return mixer.norm(y, z)

    def forward(
        self, mixer: nn.Module, hidden_states: torch.Tensor, layer: GSQStateLayer, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        batch, seq_len, _ = hidden_states.shape
        heads, head_dim, n, groups = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
        projected = self.in_projection(mixer, apply_padding_mask(hidden_states, attention_mask))
        z, xBC, dt = projected.split([mixer.intermediate_size, mixer.conv_dim, heads], dim=-1)
        xBC, conv_history = self.conv(mixer, xBC.transpose(1, 2), layer)
        xBC = apply_padding_mask(xBC.transpose(1, 2), attention_mask)
        x, B, C = torch.split(xBC, [mixer.intermediate_size, groups * n, groups * n], dim=-1)
        x = x.view(batch, seq_len, heads, head_dim)  # (B, T, H, P)
        B = B.view(batch, seq_len, groups, n)  # (B, T, G, N)
        C = C.view(batch, seq_len, groups, n)
        dt = F.softplus(dt.float() + mixer.dt_bias.float()).clamp(*mixer.time_step_limit)  # (B, T, H)
        A = -torch.exp(mixer.A_log.float())  # (H,)
        if seq_len == 1:
            y = decode_step(layer, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], mixer.D, None, conv_history)[:, None]
        else:
            y = self.scan_forward(layer, x, dt, A, B, C, mixer.D, None, conv_history)  # (B, T, H, P)
        y = self.gated_output(mixer, y.reshape(batch, seq_len, -1), z)
        return mixer.out_proj(y.to(dtype))

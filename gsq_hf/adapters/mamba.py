"""Mamba (and FalconMamba-style) mixers: state (B, D, N), one policy decision per channel.

Gate of a channel: ``1 - mean_n exp(Δ·A_n)``, the average fraction of its d_state values this step
overwrites. Unlike upstream's multi-token path, a forward on an existing cache continues from the cached
state (upstream restarts the scan from zero: chunked prefill is wrong there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import GSQStateLayer
from .base import MixerAdapter, apply_padding_mask, register_adapter

__all__ = ["MambaAdapter"]


@register_adapter
class MambaAdapter(MixerAdapter):
    family = "mamba"
    mixer_classes = ("MambaMixer",)
    unit = "channel"

    def d_state(self, mixer: nn.Module) -> int:
        return mixer.ssm_state_size

    def forward(
        self, mixer: nn.Module, hidden_states: torch.Tensor, layer: GSQStateLayer, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        batch = hidden_states.shape[0]
        n = mixer.ssm_state_size
        projected = mixer.in_proj(apply_padding_mask(hidden_states, attention_mask)).transpose(1, 2)  # (B, 2D, T)
        x, z = projected.chunk(2, dim=1)  # (B, D, T) each
        x, conv_history = self.conv(mixer, x, layer)
        x = apply_padding_mask(x.transpose(1, 2), attention_mask)  # (B, T, D)
        time_step, B, C = torch.split(mixer.x_proj(x), [mixer.time_step_rank, n, n], dim=-1)  # (B, T, R|N|N)
        dt = F.softplus(mixer.dt_proj(time_step).float())  # (B, T, D)
        A = -torch.exp(mixer.A_log.float())  # (D, N)
        dA = torch.exp(dt[..., None] * A)  # (B, T, D, N)
        dBx = dt[..., None] * B[:, :, None, :].float() * x[..., None].float()  # (B, T, D, N)
        gate = 1.0 - dA.mean(dim=-1) if layer.cache.policy.uses_gate else None  # (B, T, D)
        initial = dBx.new_zeros(batch, mixer.intermediate_size, n)  # (B, D, N)
        y = self.scan(layer, initial, dA, dBx, C[..., None], gate, x.dtype, conv_history)  # (B, T, D)
        y = (y + x * mixer.D.float()) * F.silu(z.transpose(1, 2))  # (B, T, D)
        return mixer.out_proj(y.to(dtype))

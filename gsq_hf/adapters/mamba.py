"""Mamba mixers: state (B, D, N), one policy decision per channel.

Gate of a channel: ``1 - mean_n exp(Δ·A_n)``, the average fraction of its d_state values this step
overwrites. Unlike upstream's multi-token path, a forward on an existing cache continues from the cached
state (upstream restarts the scan from zero: chunked prefill is wrong there).

The Mamba-1 variants (FalconMamba, Jamba, Zamba) differ only in how the projection is split and how Δ, B, C
are made from the conv output; they override `split_in_proj` / `selection` / `ssm_inputs` and share the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import GSQStateLayer
from ..step import decode_step
from .base import MixerAdapter, apply_padding_mask, register_adapter

__all__ = ["MambaAdapter"]


@register_adapter
class MambaAdapter(MixerAdapter):
    family = "mamba"
    mixer_classes = ("MambaMixer",)
    unit = "channel"

    def d_state(self, mixer: nn.Module) -> int:
        return mixer.ssm_state_size

    def split_in_proj(self, mixer: nn.Module, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv input ``x`` and the output gate ``z``, (B, D, T) each, from ``in_proj``'s (B, 2D, T)."""
        x, z = projected.chunk(2, dim=1)
        return x, z

    def selection(self, mixer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input-dependent (time_step, B, C), (B, T, R|N|N), from the conv output ``x`` (B, T, D)."""
        n = mixer.ssm_state_size
        time_step, B, C = torch.split(mixer.x_proj(x), [mixer.time_step_rank, n, n], dim=-1)
        return time_step, B, C

    def ssm_inputs(
        self, mixer: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x``, Δ, B and C from the conv output ``x`` (B, T, D), laid out over the state's channel dims S.

        Returns x and Δ (B, T, *S), B and C (B, T, *S[:-1], N); here S = (D,) (`gsq_hf.step`'s shapes).
        """
        time_step, B, C = self.selection(mixer, x)
        dt = F.softplus(mixer.dt_proj(time_step).float())  # (B, T, D)
        return x, dt, B, C

    def forward(
        self, mixer: nn.Module, hidden_states: torch.Tensor, layer: GSQStateLayer, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        projected = mixer.in_proj(apply_padding_mask(hidden_states, attention_mask)).transpose(1, 2)  # (B, 2D, T)
        x, z = self.split_in_proj(mixer, projected)  # (B, D, T) each
        x, conv_history = self.conv(mixer, x, layer)
        x = apply_padding_mask(x.transpose(1, 2), attention_mask)  # (B, T, D)
        x, dt, B, C = self.ssm_inputs(mixer, x)
        A = -torch.exp(mixer.A_log.float())  # (*S, N)
        z = z.transpose(1, 2).reshape(x.shape)  # (B, T, *S)
        if x.shape[1] == 1:
            y = decode_step(layer, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], mixer.D, z[:, 0], conv_history)[:, None]
        else:
            y = self.scan_forward(layer, x, dt, A, B, C, mixer.D, z, conv_history)  # (B, T, *S)
        return mixer.out_proj(y.flatten(2).to(dtype))

"""Zamba's Mamba layers: multi-head Mamba-1, state (B, H, P, N) with P = D / H, one policy decision per head.

Each head is an independent Mamba-1 over its P channels, with its own ``x_proj`` / ``dt_proj`` weights
(raw parameters ``x_proj_weight`` (H, R + 2N, P) and ``dt_proj_weight`` (H, P, R): there are no sub-modules to
call, so they are applied as upstream applies them). ``in_proj`` interleaves x and z per channel (rows 2d, 2d+1).
Gate of a head: ``1 - mean_{p,n} exp(Δ_p·A_{p,n})``, Mamba's channel gate averaged over the head's channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_adapter
from .mamba import MambaAdapter

__all__ = ["ZambaAdapter"]


@register_adapter
class ZambaAdapter(MambaAdapter):
    family = "zamba"
    mixer_classes = ("ZambaMambaMixer",)
    unit = "head"

    def split_in_proj(self, mixer: nn.Module, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, seq_len = projected.shape
        x, z = projected.view(batch, -1, 2, seq_len).unbind(2)  # (B, D, T) each
        return x, z

    def ssm_inputs(
        self, mixer: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq_len, _ = x.shape
        heads, n = mixer.n_mamba_heads, mixer.ssm_state_size
        per_head = x.transpose(1, 2).reshape(batch, heads, mixer.mamba_head_dim, seq_len).transpose(0, 1)  # (H,B,P,T)
        params = (mixer.x_proj_weight[:, None] @ per_head).transpose(-1, -2)  # (H, B, T, R + 2N)
        time_step, B, C = torch.split(params, [mixer.time_step_rank, n, n], dim=-1)
        dt = mixer.dt_proj_weight[:, None] @ time_step.transpose(-1, -2)  # (H, B, P, T)
        dt = F.softplus(dt.float() + mixer.dt_proj_bias.float()[:, None, :, None]).permute(1, 3, 0, 2)  # (B, T, H, P)
        B = B.permute(1, 2, 0, 3)  # (B, T, H, N)
        return x.reshape(batch, seq_len, heads, -1), dt, B, C.permute(1, 2, 0, 3)  # C (B, T, H, N)

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
from ..kernels.reference import ConvStep
from ..step import decode_step_conv
from .base import MixerAdapter, apply_padding_mask, loaded_weights, register_adapter

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
        dt = F.softplus(dt.float() + mixer.dt_bias.float()).clamp(*mixer.time_step_limit)  # (B, T, H)
        A = -torch.exp(mixer.A_log.float())  # (H,)

        def ssm_inputs(conv_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """x (B, T, H, P), B and C (B, T, G, N) from the conv's output (B, T, conv_dim)."""
            x, B, C = torch.split(apply_padding_mask(conv_out, attention_mask),
                                  [mixer.intermediate_size, groups * n, groups * n], dim=-1)
            return (x.view(batch, seq_len, heads, head_dim), B.view(batch, seq_len, groups, n),
                    C.view(batch, seq_len, groups, n))

        if seq_len == 1:  # the conv in the state update's launch where it can (gsq_hf.step.decode_step_conv)
            with loaded_weights(mixer.conv1d) as conv1d:
                weight, bias, u = conv1d.weight.squeeze(1), conv1d.bias, xBC[:, 0]
                y = decode_step_conv(
                    layer, ConvStep(layer.storage.conv, u, weight, bias), mixer.activation,
                    lambda: self._conv(mixer, weight, bias, u[..., None], layer),
                    lambda out: tuple(t[:, 0] for t in ssm_inputs(out[:, None])), dt[:, 0], A, mixer.D,
                    fuse=attention_mask is None)[:, None]
        else:
            xBC, conv_history = self.conv(mixer, xBC.transpose(1, 2), layer)
            x, B, C = ssm_inputs(xBC.transpose(1, 2))
            y = self.scan_forward(layer, x, dt, A, B, C, mixer.D, None, conv_history)  # (B, T, H, P)
        y = self.gated_output(mixer, y.reshape(batch, seq_len, -1), z)
        return mixer.out_proj(y.to(dtype))

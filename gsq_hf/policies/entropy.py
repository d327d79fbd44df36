"""Precision follows the model's uncertainty about the token being absorbed (one decision per batch row).

The signal is the normalized entropy ``H(p) / log(V)`` of the distribution that predicted the token now
being absorbed, or its normalized surprisal ``-log p(token) / log(V)``; either comes from the previous
step's logits, which the patch records from the LM head. Before any logits exist (the first token of a
sequence) the row is treated as uncertain and stored ``high``.
"""

from __future__ import annotations

import torch

from ..formats import StateFormat
from .base import PrecisionPolicy, Signals

__all__ = ["EntropyThresholdPolicy"]


class EntropyThresholdPolicy(PrecisionPolicy):
    name = "entropy"

    def __init__(self, low: StateFormat, high: StateFormat, threshold: float):
        super().__init__(low, high)
        self.threshold = threshold

    def choose(self, signals: Signals) -> torch.Tensor:
        batch, units = signals.shape
        if signals.row_signal is None:
            return torch.ones(batch, units, dtype=torch.bool, device=signals.device)
        return (signals.row_signal >= self.threshold)[:, None].expand(batch, units)

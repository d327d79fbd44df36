"""A fixed fraction of units per row in the high format, chosen by gate rank: bounded memory.

Threshold policies decide freely, so storage for a high copy of every unit must exist: they save bandwidth
(bytes moved per step) but not capacity. This policy stores at most ``ceil(fraction * units)`` high copies
per row, so the cache has a fixed size known before generation starts.
"""

from __future__ import annotations

import math

import torch

from ..formats import StateFormat
from .base import PrecisionPolicy, Signals

__all__ = ["GateBudgetPolicy"]


class GateBudgetPolicy(PrecisionPolicy):
    name = "budget"
    uses_gate = True

    def __init__(self, low: StateFormat, high: StateFormat, fraction: float, high_when: str = "open"):
        super().__init__(low, high)
        self.fraction = fraction
        self.high_when = high_when

    def high_capacity(self, units: int) -> int:
        return min(units, math.ceil(self.fraction * units))

    def choose(self, signals: Signals) -> torch.Tensor:
        units = signals.shape[-1]
        k = self.high_capacity(units)
        score = signals.gate if self.high_when == "open" else -signals.gate
        mask = torch.zeros_like(signals.gate, dtype=torch.bool)
        if k > 0:
            mask.scatter_(-1, score.topk(k, dim=-1).indices, True)
        return mask

"""A fixed fraction of units per row in the high format, chosen by gate rank: bounded memory.

Threshold policies decide freely, so storage for a high copy of every unit must exist: they save bandwidth
(bytes moved per step) but not capacity. This policy stores at most ``ceil(fraction * units)`` high copies
per row, so the cache has a fixed size known before generation starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..formats import StateFormat, get_format
from .base import PolicyConfig, PrecisionPolicy, Signals, fraction, one_of, option, register_policy, state_format
from .gate import HIGH_WHEN, LOW_HIGH_KEYS

__all__ = ["BudgetConfig", "GateBudgetPolicy"]


class GateBudgetPolicy(PrecisionPolicy):
    signals = frozenset({"gate"})

    def __init__(self, low: StateFormat, high: StateFormat, fraction: float, high_when: str = "open"):
        super().__init__(low, high)
        self.fraction = fraction
        self.high_when = high_when

    def high_capacity(self, units: int) -> int:
        return min(units, math.ceil(self.fraction * units))

    def choose(self, signals: Signals) -> torch.Tensor:
        units = signals.shape[-1]
        k = self.high_capacity(units)
        gate = signals.get("gate")
        score = gate if self.high_when == "open" else -gate
        mask = torch.zeros_like(gate, dtype=torch.bool)
        if k > 0:
            mask.scatter_(-1, score.topk(k, dim=-1).indices, True)
        return mask


@register_policy("budget")
@dataclass(frozen=True)
class BudgetConfig(PolicyConfig):
    fraction: float = option(0.25, fraction, "fraction of units per row in the high format, in [0, 1]")
    high_when: str = option("open", one_of(*HIGH_WHEN), "'open' or 'closed' units rank first for the high slots")
    low: str = option("int8", state_format, "format of every unit")
    high: str = option("fp16", state_format, "format of the high copies")
    flat_keys = {"budget_fraction": "fraction", "high_when": "high_when", **LOW_HIGH_KEYS}

    def build(self) -> GateBudgetPolicy:
        return GateBudgetPolicy(get_format(self.low), get_format(self.high), self.fraction, self.high_when)

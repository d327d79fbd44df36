"""The GSQ idea: precision follows the layer's own gate (`gsq_hf.signals.gate`).

The gate of a unit is ``1 - mean exp(Δ·A)`` over its state values: the fraction of the old state that this
step overwrites, on average (Mamba2: one decay per head, no reduction needed).

``high_when="open"`` is the seed's rule (state changing → high precision). ``high_when="closed"`` keeps
the slow, long-memory units precise instead: their quantization error persists for many steps, while an
open unit's error is overwritten within a few tokens (see docs/results for what each wins).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import StateFormat, get_format
from .base import PolicyConfig, PrecisionPolicy, Signals, fraction, one_of, option, register_policy, state_format

__all__ = ["GateConfig", "GateThresholdPolicy", "HIGH_WHEN"]

HIGH_WHEN = ("open", "closed")
LOW_HIGH_KEYS = {"low_format": "low", "high_format": "high"}  # the flat keys every two-format policy had


class GateThresholdPolicy(PrecisionPolicy):
    signals = frozenset({"gate"})

    def __init__(self, low: StateFormat, high: StateFormat, threshold: float, high_when: str = "open"):
        super().__init__(low, high)
        self.threshold = threshold
        self.high_when = high_when

    def kernel_rule(self) -> tuple[str, float]:
        return (self.high_when, float(self.threshold))

    def choose(self, signals: Signals) -> torch.Tensor:
        if self.high_when == "open":
            return signals.get("gate") >= self.threshold
        return signals.get("gate") < self.threshold


@register_policy("gate")
@dataclass(frozen=True)
class GateConfig(PolicyConfig):
    threshold: float = option(0.3, fraction, "gate threshold, in [0, 1]")
    high_when: str = option("open", one_of(*HIGH_WHEN), "'open' or 'closed' units get the high format")
    low: str = option("int8", state_format, "format of units the policy leaves low")
    high: str = option("fp16", state_format, "format of units the policy marks high")
    flat_keys = {"threshold": "threshold", "high_when": "high_when", **LOW_HIGH_KEYS}

    def build(self) -> GateThresholdPolicy:
        return GateThresholdPolicy(get_format(self.low), get_format(self.high), self.threshold, self.high_when)

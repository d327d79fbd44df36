"""The GSQ idea: precision follows the layer's own gate.

The gate of a unit is ``1 - mean_n exp(Δ·A_n)`` for Mamba (averaged over the ``d_state`` decay rates of a
channel: the fraction of the old state that this step overwrites, on average) and ``1 - exp(Δ·A)`` for
Mamba2 (one decay per head, no reduction needed). The mean, rather than the min or max over ``n``, weighs
every state element equally, matching what a per-channel quantization scale covers.

``high_when="open"`` is the seed's rule (state changing → high precision). ``high_when="closed"`` keeps
the slow, long-memory units precise instead: their quantization error persists for many steps, while an
open unit's error is overwritten within a few tokens (see docs/results for what each wins).
"""

from __future__ import annotations

import torch

from ..formats import StateFormat
from .base import PrecisionPolicy, Signals

__all__ = ["GateThresholdPolicy"]


class GateThresholdPolicy(PrecisionPolicy):
    name = "gate"
    uses_gate = True

    def __init__(self, low: StateFormat, high: StateFormat, threshold: float, high_when: str = "open"):
        super().__init__(low, high)
        self.threshold = threshold
        self.high_when = high_when

    def choose(self, signals: Signals) -> torch.Tensor:
        if self.high_when == "open":
            return signals.gate >= self.threshold
        return signals.gate < self.threshold

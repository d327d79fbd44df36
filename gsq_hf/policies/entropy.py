"""Precision follows the model's uncertainty about the token being absorbed (one decision per batch row).

The signal is the normalized entropy ``H(p) / log(V)`` of the distribution that predicted the token now
being absorbed, or its normalized surprisal ``-log p(token) / log(V)`` (`gsq_hf.signals`); either comes from
the previous step's logits, which the patch records from the LM head. Before any logits exist (the first
token of a sequence) the row is treated as uncertain and stored ``high``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import StateFormat, get_format
from .base import PolicyConfig, PrecisionPolicy, Signals, fraction, one_of, option, register_policy, state_format
from .gate import LOW_HIGH_KEYS

__all__ = ["EntropyConfig", "EntropyThresholdPolicy"]


class EntropyThresholdPolicy(PrecisionPolicy):
    def __init__(self, low: StateFormat, high: StateFormat, threshold: float, signal: str = "entropy"):
        super().__init__(low, high)
        self.threshold = threshold
        self.signal = signal
        self.signals = frozenset({signal})

    def kernel_rule(self) -> tuple[str, float]:
        return ("row", 0.0)

    def choose(self, signals: Signals) -> torch.Tensor:
        batch, units = signals.shape
        row = signals.get(self.signal)
        if row is None:
            return torch.ones(batch, units, dtype=torch.bool, device=signals.device)
        return (row >= self.threshold)[:, None].expand(batch, units)


@register_policy("entropy")
@dataclass(frozen=True)
class EntropyConfig(PolicyConfig):
    threshold: float = option(0.3, fraction, "normalized entropy (or surprisal) threshold, in [0, 1]")
    signal: str = option("entropy", one_of("entropy", "surprisal"),
                         "'entropy' of the whole next-token distribution or 'surprisal' of the absorbed token")
    low: str = option("int8", state_format, "format of confident rows")
    high: str = option("fp16", state_format, "format of uncertain rows")
    flat_keys = {"threshold": "threshold", "entropy_signal": "signal", **LOW_HIGH_KEYS}

    def build(self) -> EntropyThresholdPolicy:
        return EntropyThresholdPolicy(get_format(self.low), get_format(self.high), self.threshold, self.signal)

"""The precision-policy interface: signals in, a high-precision mask out.

A policy stores every state unit (a (batch row, channel) of Mamba, a (batch row, head) of Mamba2) in its
``low`` format and, for the units it marks, also in its ``high`` format; readers take the high copy where
it exists. ``high_capacity`` bounds how many units per row may hold a high copy: threshold policies need
all of them (they save bandwidth, not capacity), a budget policy a fixed fraction (it saves both).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import StateFormat

__all__ = ["PrecisionPolicy", "Signals"]


@dataclass(frozen=True)
class Signals:
    """What a policy may look at when a state is written.

    shape: ``(batch, units)`` of the decision.
    gate: ``(batch, units)`` in [0, 1]: the layer's update strength this step (1 - retained fraction of the
        old state, from Δ·A); large = new information entering. Computed only for policies that use it.
    row_signal: ``(batch,)`` in [0, 1]: normalized entropy (or surprisal) of the model's own next-token
        distribution for the token being absorbed; ``None`` before the model has produced any logits.
    """

    shape: tuple[int, int]
    device: torch.device
    gate: torch.Tensor | None = None
    row_signal: torch.Tensor | None = None


class PrecisionPolicy(ABC):
    """Decides, at every state write, which units get the ``high`` format."""

    name: ClassVar[str]
    uses_gate: ClassVar[bool] = False  # adapters compute the gate signal only for policies that read it

    def __init__(self, low: StateFormat, high: StateFormat | None = None):
        self.low = low
        self.high = high

    @property
    def formats(self) -> tuple[StateFormat, ...]:
        return (self.low,) if self.high is None else (self.low, self.high)

    def high_capacity(self, units: int) -> int:
        """Slots per row for high copies (0: no high format; ``units``: unbounded)."""
        return 0 if self.high is None else units

    @abstractmethod
    def choose(self, signals: Signals) -> torch.Tensor | None:
        """``(batch, units)`` bool mask of units stored in ``high``, or ``None`` when every unit is ``low``."""

    def __repr__(self) -> str:
        fmts = "/".join(f.name for f in self.formats)
        return f"{type(self).__name__}({fmts})"

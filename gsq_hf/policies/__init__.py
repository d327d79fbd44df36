"""Precision policies, one class per file, registered by name."""

from .base import PrecisionPolicy, Signals
from .budget import GateBudgetPolicy
from .entropy import EntropyThresholdPolicy
from .gate import GateThresholdPolicy
from .static import StaticPolicy

POLICIES: dict[str, type[PrecisionPolicy]] = {
    cls.name: cls for cls in (StaticPolicy, GateThresholdPolicy, EntropyThresholdPolicy, GateBudgetPolicy)
}

__all__ = [
    "POLICIES",
    "EntropyThresholdPolicy",
    "GateBudgetPolicy",
    "GateThresholdPolicy",
    "PrecisionPolicy",
    "Signals",
    "StaticPolicy",
]

"""Precision policies, one kind per file (its `PolicyConfig` and its `PrecisionPolicy`), registered by kind."""

from .base import POLICY_CONFIGS, PolicyConfig, PrecisionPolicy, Signals, policy_config, register_policy

# the import order is the registration order: the order in which errors list the kinds
# isort: off
from .static import StaticConfig, StaticPolicy
from .gate import GateConfig, GateThresholdPolicy
from .entropy import EntropyConfig, EntropyThresholdPolicy
from .budget import BudgetConfig, GateBudgetPolicy
# isort: on

__all__ = [
    "POLICY_CONFIGS",
    "BudgetConfig",
    "EntropyConfig",
    "EntropyThresholdPolicy",
    "GateBudgetPolicy",
    "GateConfig",
    "GateThresholdPolicy",
    "PolicyConfig",
    "PrecisionPolicy",
    "Signals",
    "StaticConfig",
    "StaticPolicy",
    "policy_config",
    "register_policy",
]

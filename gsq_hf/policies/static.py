"""One format everywhere: the uniform baseline every dynamic policy must beat at equal bits."""

from __future__ import annotations

from dataclasses import dataclass

from ..formats import get_format
from .base import PolicyConfig, PrecisionPolicy, Signals, option, register_policy, state_format

__all__ = ["StaticConfig", "StaticPolicy"]


class StaticPolicy(PrecisionPolicy):
    def kernel_rule(self) -> tuple[str, float]:
        return ("static", 0.0)

    def choose(self, signals: Signals) -> None:
        return None


@register_policy("static")
@dataclass(frozen=True)
class StaticConfig(PolicyConfig):
    format: str = option("fp32", state_format, "the state format: <codes>[-<scale>][-hadamard] (gsq_hf.formats), "
                                               "or a mapping {codes, scale, rotation}")
    flat_keys = {"format": "format"}

    def build(self) -> StaticPolicy:
        return StaticPolicy(get_format(self.format))

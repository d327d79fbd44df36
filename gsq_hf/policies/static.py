"""One format everywhere: the uniform baseline every dynamic policy must beat at equal bits."""

from __future__ import annotations

from .base import PrecisionPolicy, Signals

__all__ = ["StaticPolicy"]


class StaticPolicy(PrecisionPolicy):
    name = "static"

    def choose(self, signals: Signals) -> None:
        return None

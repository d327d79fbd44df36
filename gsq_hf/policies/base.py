"""The precision-policy interface: a config per policy kind, signals in, a high-precision mask out.

A policy stores every state unit (a (batch row, channel) of Mamba, a (batch row, head) of Mamba2) in its
``low`` format and, for the units it marks, also in its ``high`` format; readers take the high copy where
it exists. ``high_capacity`` bounds how many units per row may hold a high copy: threshold policies need
all of them (they save bandwidth, not capacity), a budget policy a fixed fraction (it saves both).

A policy kind is one `PolicyConfig` subclass registered with `register_policy` (its fields validated by the
``check`` in their metadata) whose ``build`` makes the `PrecisionPolicy`; the policy declares the
``signals`` it reads (`gsq_hf.signals` provides them). A new policy is one file plus a preset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from ..errors import GSQConfigError
from ..formats import StateFormat, get_format

__all__ = ["POLICY_CONFIGS", "PolicyConfig", "PrecisionPolicy", "Signals", "fraction", "one_of", "option",
           "policy_config", "register_policy", "state_format"]


@dataclass(frozen=True)
class Signals:
    """What a policy may look at when a state is written.

    shape: ``(batch, units)`` of the decision. ``values``: the signals the policy declared, by name, that
    exist now: per unit ``(batch, units)`` (``gate``: the update strength 1 - exp(Δ·A), in [0, 1]) or per row
    ``(batch,)`` (``entropy``/``surprisal`` of the model's own next-token distribution, normalized to [0, 1];
    absent before the model has produced any logits). See `gsq_hf.signals`.
    """

    shape: tuple[int, int]
    device: torch.device
    values: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor | None:
        return self.values.get(name)


class PrecisionPolicy(ABC):
    """Decides, at every state write, which units get the ``high`` format."""

    signals: frozenset[str] = frozenset()  # what `choose` reads (`gsq_hf.signals`); providers run only for these

    def __init__(self, low: StateFormat, high: StateFormat | None = None):
        self.low = low
        self.high = high

    @property
    def formats(self) -> tuple[StateFormat, ...]:
        return (self.low,) if self.high is None else (self.low, self.high)

    @property
    def is_lossless(self) -> bool:
        """True when every state write is exact (every format fp32)."""
        return all(f.lossless for f in self.formats)

    def high_capacity(self, units: int) -> int:
        """Slots per row for high copies (0: no high format; ``units``: unbounded)."""
        return 0 if self.high is None else units

    def kernel_rule(self) -> tuple[str, float] | None:
        """How the fused kernel decides in registers: ``("static", 0)``, ``("open"|"closed", threshold)`` (gate
        ≥ / < threshold) or ``("row", 0)`` (`choose` per batch row, on a row signal); None: the kernel cannot."""
        return None

    @abstractmethod
    def choose(self, signals: Signals) -> torch.Tensor | None:
        """``(batch, units)`` bool mask of units stored in ``high``, or ``None`` when every unit is ``low``."""

    def __repr__(self) -> str:
        fmts = "/".join(f.name for f in self.formats)
        return f"{type(self).__name__}({fmts})"


# -- field checks: (where, value) -> the value as stored, or a one-line GSQConfigError -----------------------
Check = Callable[[str, Any], Any]


def state_format(where: str, value: Any) -> str:
    """A state format given by name or parts, stored by its canonical name."""
    try:
        return get_format(value).name
    except GSQConfigError as error:
        raise GSQConfigError(f"{where}={value!r} is not accepted; {error}") from None


def fraction(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise GSQConfigError(f"{where}={value!r} must be a number in [0, 1]")
    return value


def one_of(*accepted: str) -> Check:
    def check(where: str, value: Any) -> str:
        if value not in accepted:
            raise GSQConfigError(f"{where}={value!r} is not accepted; choose one of: {', '.join(accepted)}")
        return value

    return check


def option(default: Any, check: Check, help: str) -> Any:  # noqa: A002 (the dataclass metadata key)
    """A `PolicyConfig` field: its default, the check run on construction and a line of help."""
    return field(default=default, metadata={"check": check, "help": help})


# -- configs and their registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyConfig(ABC):
    """The parameters of one policy kind; frozen, validated on construction, serialized with its ``kind``."""

    kind: ClassVar[str] = ""
    flat_keys: ClassVar[Mapping[str, str]] = {}  # flat GSQConfig key of old configs -> field of this config

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(f"{type(self).__name__}.{f.name}", getattr(self, f.name)))

    @abstractmethod
    def build(self) -> PrecisionPolicy:
        """The policy these parameters describe."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}


POLICY_CONFIGS: dict[str, type[PolicyConfig]] = {}


def register_policy(kind: str) -> Callable[[type[PolicyConfig]], type[PolicyConfig]]:
    """Class decorator: make a `PolicyConfig` subclass the config of policy ``kind`` (``GSQConfig(policy=kind)``)."""

    def register(cls: type[PolicyConfig]) -> type[PolicyConfig]:
        if not (isinstance(cls, type) and issubclass(cls, PolicyConfig)):
            raise TypeError(f"register_policy({kind!r}) decorates a PolicyConfig subclass, got {cls!r}")
        cls.kind = kind
        POLICY_CONFIGS[kind] = cls
        return cls

    return register


def policy_config(value: Any, where: str = "GSQConfig.policy") -> PolicyConfig:
    """A `PolicyConfig` from itself, a registered kind (its defaults) or a mapping ``{kind: ..., <fields>}``."""
    if isinstance(value, PolicyConfig):
        return value
    if isinstance(value, Mapping):
        params = dict(value)
        kind = params.pop("kind", None)
    else:
        params, kind = {}, value
    if not isinstance(kind, str) or kind not in POLICY_CONFIGS:
        raise GSQConfigError(f"{where}={kind!r} is not accepted; choose one of: {', '.join(POLICY_CONFIGS)}")
    cls = POLICY_CONFIGS[kind]
    known = [f.name for f in fields(cls)]
    unknown = sorted(map(str, set(params) - set(known)))
    if unknown:
        raise GSQConfigError(f"{where}: unknown {cls.__name__} field(s) {unknown}; accepted: kind, {', '.join(known)}")
    return cls(**params)


"""Signal providers: what a precision policy may read (`PrecisionPolicy.signals`), each computed in one place.

* Per unit, from the decode step: ``gate`` (`gate`), the fraction of a unit's old state this step overwrites.
* Per batch row, from the model's own next-token distribution (`ROW_SIGNALS`, recorded at the LM head by
  the cache): ``entropy`` of the distribution that predicted the token being absorbed, or its ``surprisal``
  of that token, both normalized by ``log(vocab)`` to [0, 1]. A new row signal is one `register_row_signal`.

The cache computes only the signals its policy declares and hands them to ``policy.choose``. Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import GSQConfigError
from .policies.base import Signals

__all__ = ["ROW_SIGNALS", "UNIT_SIGNALS", "RowSignal", "check_signals", "gate", "reads_logits",
           "register_row_signal", "step_signals"]

UNIT_SIGNALS = frozenset({"gate"})


def gate(decay: torch.Tensor, inner_dims: int) -> torch.Tensor:
    """The gate of each unit: ``1 - mean exp(Δ·A)`` over its last ``inner_dims`` dims of ``decay`` = exp(Δ·A).

    Mamba: decay (…, D, N), inner 1 (the channel's d_state rates); Zamba: (…, H, P, N), inner 2 (a head's
    channels); Mamba2: (…, H, 1, 1), one decay per head. The mean, rather than the min or max, weighs every
    state element equally, matching what a per-unit quantization scale covers.
    """
    return 1.0 - decay.flatten(-inner_dims).mean(dim=-1)


@dataclass(frozen=True)
class RowSignal:
    """A per-row signal from log-probs ``(batch, vocab)`` (and, if ``needs_token``, the absorbed token (batch, 1))."""

    compute: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    needs_token: bool = False


ROW_SIGNALS: dict[str, RowSignal] = {}


def register_row_signal(name: str, compute: Callable, needs_token: bool = False) -> None:
    """Make ``name`` a signal policies may declare: ``compute(logprobs, token)`` -> (batch,) in [0, 1]."""
    ROW_SIGNALS[name] = RowSignal(compute, needs_token)


def _entropy(logprobs: torch.Tensor, token: torch.Tensor | None) -> torch.Tensor:
    return (-(logprobs.exp() * logprobs).sum(-1) / math.log(logprobs.shape[-1])).clamp(0.0, 1.0)


def _surprisal(logprobs: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return (-logprobs.gather(1, token)[:, 0] / math.log(logprobs.shape[-1])).clamp(0.0, 1.0)


register_row_signal("entropy", _entropy)
register_row_signal("surprisal", _surprisal, needs_token=True)


def step_signals(policy, shape: tuple[int, int], device: torch.device, gate: torch.Tensor | None,
                 row_signal: torch.Tensor | None) -> Signals:
    """What ``policy`` reads at a write of ``shape`` (batch, units): the step's gate and the row signal it
    declares, where they exist."""
    values = {} if gate is None else {"gate": gate}
    if row_signal is not None:
        values |= {name: row_signal for name in policy.signals if name in ROW_SIGNALS}
    return Signals(shape, device, values)


def check_signals(policy) -> None:
    """Refuse a policy that declares a signal no provider computes, or more than one row signal."""
    known = UNIT_SIGNALS | set(ROW_SIGNALS)
    unknown = sorted(set(policy.signals) - known)
    if unknown:
        raise GSQConfigError(f"{type(policy).__name__} reads signal(s) {unknown}; known: {', '.join(sorted(known))}")
    rows = sorted(set(policy.signals) & set(ROW_SIGNALS))
    if len(rows) > 1:
        raise GSQConfigError(f"{type(policy).__name__} reads row signals {rows}; a policy reads at most one")


def reads_logits(policy) -> bool:
    """Whether ``policy`` reads the model's next-token distribution (which a multi-token forward lacks inside)."""
    return bool(set(policy.signals) & set(ROW_SIGNALS))

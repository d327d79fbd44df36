"""Position buckets of a scored window: how an error spreads along a stream.

With one long window per stream, ΣNLL (and KL vs a reference) summed per range of positions shows whether a
quantized state's error accumulates with length (`decode_faithful_perplexity`'s ``position_buckets=``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PositionBuckets", "bucket_labels", "bucket_of_step", "log_position_buckets"]


def log_position_buckets(length: int, first: int = 256, factor: int = 4) -> list[int]:
    """Bucket starts ``0, first, first·factor, ...`` below ``length``: log-spaced, so that an error which
    accumulates along a stream shows as a trend over a few buckets of similar weight on a log axis."""
    starts, start = [0], first
    while start < length:
        starts.append(start)
        start *= factor
    return starts


def bucket_labels(starts: Sequence[int], ends: Sequence[int]) -> list[str]:
    """``"1–255"``-style labels of the scored positions in each bucket (position 0 is never scored)."""
    return [f"{max(start, 1)}–{end - 1}" for start, end in zip(starts, ends, strict=True)]


@dataclass(frozen=True)
class PositionBuckets:
    """ΣNLL and scored tokens per range of positions within the windows, summed over windows, and ΣNLL per
    window (the spread over windows says how much of a difference between configs is noise).

    Bucket i holds the tokens at window positions ``starts[i] <= p < ends[i]`` (position 0 is never scored).
    """

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    nll_sum: tuple[float, ...]
    tokens: tuple[int, ...]
    window_nll_sum: tuple[tuple[float, ...], ...]  # (windows, buckets)
    window_kl_sum: tuple[tuple[float, ...], ...] | None = None  # (windows, buckets), when scored vs a reference

    @property
    def perplexity(self) -> list[float]:
        return [math.exp(nll / n) for nll, n in zip(self.nll_sum, self.tokens, strict=True)]

    @property
    def kl_divergence(self) -> list[float] | None:
        """Mean KL(reference ‖ config) per token in each bucket (nats), or None without a reference."""
        if self.window_kl_sum is None:
            return None
        return [sum(col) / n for col, n in zip(zip(*self.window_kl_sum, strict=True), self.tokens, strict=True)]

    def to_dict(self) -> dict[str, list]:
        kl = {} if self.window_kl_sum is None else {
            "kl_divergence": self.kl_divergence, "window_kl_sum": [list(row) for row in self.window_kl_sum]}
        return {"starts": list(self.starts), "ends": list(self.ends), "nll_sum": list(self.nll_sum),
                "tokens": list(self.tokens), "perplexity": self.perplexity,
                "window_nll_sum": [list(row) for row in self.window_nll_sum], **kl}


def bucket_of_step(starts: Sequence[int], context: int) -> tuple[tuple[int, ...], torch.Tensor]:
    """The buckets that hold scored positions ``1..context-1`` and the bucket index of each decode step
    (step t scores position t+1); starts at or beyond ``context`` would be empty and are dropped."""
    starts = [int(s) for s in starts]
    if not starts or starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)):
        raise ValueError(f"position buckets are increasing bucket starts beginning at 0, got {starts}")
    kept = tuple(s for s in starts if s < context)
    return kept, torch.bucketize(torch.arange(1, context), torch.tensor(kept), right=True) - 1

"""Differences from a baseline scored on the same units, with their paired standard errors.

Every config of an evaluation is scored on the same token windows (perplexity) or the same seeded sequences
(recall) as its baseline (fp32). What makes one window or sequence hard is common to both runs and cancels in
their difference, so the noise of a difference is the spread of the per-unit differences: its standard error
is theirs over the units, ``std / √units``. The units are independent: each window and each sequence starts
from a fresh state (`decode_faithful_perplexity`, `recall_accuracy`). Every unit scores the same number of
tokens (queries), so the mean of the per-unit differences is the pooled difference exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["mean_stderr", "nll_deltas", "perplexity_delta", "recall_delta"]


def mean_stderr(values: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean over dim 0 (NaN with fewer than two rows)."""
    if values.shape[0] < 2:
        return torch.full(values.shape[1:], math.nan, dtype=values.dtype)
    return values.std(dim=0) / math.sqrt(values.shape[0])


def nll_deltas(window_nll: Sequence, base_window_nll: Sequence, tokens: Sequence | float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Δ mean NLL per token (nats) and Δ perplexity (relative) vs the baseline, each with its paired standard
    error, from per-window ΣNLL ``(windows, *buckets)`` on the same windows; ``tokens``: scored tokens of all
    windows together (per bucket).

    Δ perplexity = exp(Δ mean NLL) - 1, which is the perplexity ratio - 1 exactly; its standard error is
    exp(Δ mean NLL) x that of Δ mean NLL (first order).
    """
    config = torch.as_tensor(window_nll, dtype=torch.float64)
    base = torch.as_tensor(base_window_nll, dtype=torch.float64)
    per_window = (config - base) / (torch.as_tensor(tokens, dtype=torch.float64) / config.shape[0])
    delta_nll, nll_stderr = per_window.mean(dim=0), mean_stderr(per_window)
    return delta_nll, nll_stderr, torch.expm1(delta_nll), delta_nll.exp() * nll_stderr


def perplexity_delta(record: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """``delta_nll``, ``delta_nll_stderr`` and ``delta_stderr`` (of Δ perplexity) of a record vs ``base``, from
    their ``window_nll_sum``; None each where either has none or they were scored on other numbers of windows."""
    mine, theirs = record.get("window_nll_sum"), base.get("window_nll_sum")
    if not mine or not theirs or len(mine) != len(theirs) or record.get("tokens") != base.get("tokens"):
        return dict.fromkeys(("delta_nll", "delta_nll_stderr", "delta_stderr"))
    delta_nll, nll_stderr, _, stderr = nll_deltas(mine, theirs, record["tokens"])
    return {"delta_nll": float(delta_nll), "delta_nll_stderr": float(nll_stderr), "delta_stderr": float(stderr)}


def recall_delta(sequence_correct: Sequence[int], base_sequence_correct: Sequence[int],
                 queries: int) -> tuple[float, float]:
    """Recall difference vs the baseline (a fraction) and its paired standard error, from the correct answers
    per sequence of both runs on the same sequences (``queries`` in all, the same number per sequence)."""
    hits = torch.as_tensor(sequence_correct, dtype=torch.float64)
    per_sequence = (hits - torch.as_tensor(base_sequence_correct, dtype=torch.float64)) / (queries / hits.shape[0])
    return float(per_sequence.mean()), float(mean_stderr(per_sequence))

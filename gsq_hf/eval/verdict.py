"""Does a config beat a reference front at equal stored bits, and does an error grow along a stream: numbers.

The reference front is a family of static configs (the round-to-nearest uniform formats by default),
interpolated linearly in average stored bits between the two neighbouring points (no verdict outside their
range; for KL linearly in log KL, as KL falls about geometrically with the bits). A config "beats" it only by
more than its noise: ``n_se`` standard errors of the difference (Δ perplexity and KL: over the windows, each
config paired with fp32 on the same windows; recall: binomial), or a fixed margin for Δ perplexity where no
standard error is known (records without per-window sums, a single window). Every function returns records of
numbers; the sentences are the report's (``scripts/results.py``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .paired import mean_stderr, nll_deltas

__all__ = ["GROWTH_PP", "KL_SE", "PPL_MARGIN_PP", "PPL_SE", "RECALL_SE", "UNIFORM", "beats_front", "binomial_stderr",
           "bucket_deltas", "bucket_kl_stderr", "has_paired_stderr", "interpolate_front", "is_dynamic", "kl_growth",
           "kl_verdicts", "perplexity_verdicts", "recall_verdicts", "stream_growth"]

UNIFORM = "uniform"  # the round-to-nearest uniform formats: the front every verdict compares against by default
PPL_SE = 2.0  # perplexity: Δ lower by more than this many paired standard errors (over windows) of the difference
PPL_MARGIN_PP = 0.1  # ... or, where no standard error is known, by this many percentage points (the "lossless" bar)
RECALL_SE = 2.0  # recall: better by more than this many binomial standard errors of the difference
KL_SE = 2.0  # KL vs fp32: lower by more than this many standard errors (over windows) of the difference
GROWTH_PP = 0.1  # long streams: |Δ| rising by more than this (and twice its standard error) is growth


def is_dynamic(record: dict[str, Any]) -> bool:
    """A config whose policy decides per unit (not static): what the verdicts judge by default."""
    return record.get("policy", record.get("gsq_config", {}).get("policy")) != "static"


def interpolate_front(points: Sequence[tuple[float, float, float]], bits: float) -> tuple[float, float] | None:
    """The front at ``bits``: ``(value, stderr)`` linearly interpolated between the two neighbouring points
    ``(bits, value, stderr)``; None outside their range. Of several points at the same bits (bf16, fp16) the
    first in ``points`` counts (callers put the best first)."""
    curve: list[tuple[float, float, float]] = []
    for point in sorted(points, key=lambda p: p[0]):  # stable: the first of equal bits wins
        if not (curve and math.isclose(curve[-1][0], point[0], rel_tol=1e-9)):
            curve.append(point)
    if not curve or not curve[0][0] - 1e-9 <= bits <= curve[-1][0] + 1e-9:
        return None
    for (x0, y0, e0), (x1, y1, e1) in itertools.pairwise(curve):
        if x0 - 1e-9 <= bits <= x1 + 1e-9:
            w = (bits - x0) / (x1 - x0)
            return y0 + w * (y1 - y0), math.hypot((1 - w) * e0, w * e1)
    return curve[0][1], curve[0][2]  # a single point, at exactly its bits


def beats_front(records: Sequence[dict[str, Any]], *, value: str, higher_is_better: bool, stderr: str | None = None,
                margin: float = 0.0, n_se: float = RECALL_SE, front: str = UNIFORM,
                judged: Callable[[dict[str, Any]], bool] = is_dynamic) -> list[dict[str, Any]]:
    """Each ``judged`` record outside the ``front`` family against that family interpolated at its bits:
    ``{"config", "family", "front", "bits", "value", "reference", "gain", "noise", "beats"}``; ``gain`` > 0 is
    better, ``noise`` = max(``margin``, ``n_se`` x the standard error of the difference), ``beats`` = gain >
    noise; ``reference``/``gain``/``noise``/``beats`` are None outside the front's bits. ``stderr``: the key of a
    record's standard error (None: 0). Records with an error or a non-finite value are left out."""
    def se(r):
        return float(r.get(stderr) or 0.0) if stderr else 0.0

    ok = [r for r in records if not r.get("error") and isinstance(r.get(value), (int, float))
          and math.isfinite(r[value]) and isinstance(r.get("avg_state_bits"), (int, float))]
    sign = 1.0 if higher_is_better else -1.0
    points = sorted(((r["avg_state_bits"], r[value], se(r)) for r in ok if r["family"] == front),
                    key=lambda p: (p[0], -sign * p[1]))  # at equal bits the best first
    verdicts = []
    for r in ok:
        if r["family"] == front or not judged(r):
            continue
        curve = interpolate_front(points, r["avg_state_bits"])
        entry = {"config": r["config"], "family": r["family"], "front": front, "bits": r["avg_state_bits"],
                 "value": r[value], "reference": None, "gain": None, "noise": None, "beats": None}
        if curve is not None:
            gain = sign * (r[value] - curve[0])
            noise = max(margin, n_se * math.hypot(se(r), curve[1]))
            entry.update(reference=curve[0], gain=gain, noise=noise, beats=gain > noise)
        verdicts.append(entry)
    return verdicts


def has_paired_stderr(group: Sequence[dict[str, Any]]) -> bool:
    """Whether every scored record of ``group`` has a finite paired standard error of its Δ perplexity vs fp32
    (``delta_stderr``, `gsq_hf.eval.paired.perplexity_delta`)."""
    scored = [r for r in group if not r.get("error") and r.get("delta_vs_fp32") is not None]
    return bool(scored) and all(isinstance(r.get("delta_stderr"), float) and math.isfinite(r["delta_stderr"])
                                for r in scored)


def perplexity_verdicts(group: Sequence[dict[str, Any]], **options) -> list[dict[str, Any]]:
    """`beats_front` on Δ perplexity vs fp32 (lower is better) by more than `PPL_SE` standard errors of the
    difference, each Δ's paired over the windows (combined as for KL), where `has_paired_stderr`; else by the
    fixed `PPL_MARGIN_PP` margin."""
    if has_paired_stderr(group):
        return beats_front(group, value="delta_vs_fp32", higher_is_better=False, stderr="delta_stderr", n_se=PPL_SE,
                           **options)
    return beats_front(group, value="delta_vs_fp32", higher_is_better=False, margin=PPL_MARGIN_PP / 100, **options)


def kl_verdicts(group: Sequence[dict[str, Any]], **options) -> list[dict[str, Any]]:
    """`beats_front` on log KL vs fp32 (lower is better; ``value`` and ``reference`` are natural logs, ``gain``
    the log of the factor) with `KL_SE` standard errors; records without a positive KL are left out."""
    records = [{**r, "log_kl": math.log(r["kl_divergence"]),
                "log_kl_stderr": r["kl_stderr"] / r["kl_divergence"] if math.isfinite(r["kl_stderr"]) else 0.0}
               for r in group if not r.get("error") and isinstance(r.get("kl_divergence"), float)
               and r["kl_divergence"] > 0]
    return beats_front(records, value="log_kl", higher_is_better=False, stderr="log_kl_stderr", n_se=KL_SE,
                       **options)


def binomial_stderr(correct: int, queries: int) -> float:
    """Standard error of a recall of ``correct``/``queries`` from the add-one estimate (correct + 1) /
    (queries + 2): never 0, so a config with no miss still carries the noise of its sample."""
    p = (correct + 1) / (queries + 2)
    return math.sqrt(p * (1 - p) / queries)


def recall_verdicts(records: Sequence[dict[str, Any]], gaps: Sequence[int], **options) -> dict[str, list[dict]]:
    """`beats_front` on recall (higher is better, `RECALL_SE` binomial standard errors) per ``"gap G"`` and,
    with several gaps, for ``"all gaps"`` pooled. Records carry ``recall_stderr`` and ``by_gap``."""
    def at_gap(gap):
        if gap is None:
            return records
        return [{**r, **{key: r["by_gap"][str(gap)][key] for key in ("recall", "recall_stderr", "avg_state_bits")}}
                for r in records]

    return {("all gaps" if gap is None else f"gap {gap}"): beats_front(
                at_gap(gap), value="recall", higher_is_better=True, stderr="recall_stderr", **options)
            for gap in ([None] if len(gaps) > 1 else []) + list(gaps)}


# -- long streams -------------------------------------------------------------------------------------
def bucket_deltas(buckets: dict[str, Any], fp32: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Δ perplexity vs fp32 per position bucket (all streams pooled) and its paired standard error over the
    streams (NaN with one stream; `gsq_hf.eval.paired.nll_deltas`): every stream has the same tokens in a bucket."""
    _, _, delta, stderr = nll_deltas(buckets["window_nll_sum"], fp32["window_nll_sum"], buckets["tokens"])
    return delta.tolist(), stderr.tolist()


def bucket_kl_stderr(buckets: dict[str, Any]) -> list[float]:
    """Standard error over the streams of each bucket's mean KL (NaN with one stream)."""
    per_stream = torch.tensor(buckets["window_kl_sum"], dtype=torch.float64)  # (streams, buckets)
    tokens_per_stream = torch.tensor(buckets["tokens"], dtype=torch.float64) / per_stream.shape[0]
    return mean_stderr(per_stream / tokens_per_stream).tolist()


def _rise(delta: Sequence[float], stderr: Sequence[float], before: int, after: int) -> float:
    """How far |Δ| rises from bucket ``before`` to ``after`` beyond max(`GROWTH_PP`, 2 standard errors of the
    difference); < 0: it does not."""
    noise = 2 * math.hypot(stderr[before], stderr[after])
    threshold = max(GROWTH_PP / 100, noise if math.isfinite(noise) else 0.0)
    return abs(delta[after]) - abs(delta[before]) - threshold


def stream_growth(group: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scored long-stream record after fp32: ``{"config", "grows", "shrinks", "still_growing", "first",
    "last"}``: |Δ| rises from the first position bucket to the last (`_rise`), falls, rises between the last two
    (only with more than two buckets, else None); ``first``/``last``: (Δ, stderr) there. Empty with fewer than
    two buckets."""
    out = []
    for r in group[1:]:
        if r.get("delta_vs_fp32") is None or len(r["position_buckets"]["delta_vs_fp32"]) < 2:
            continue
        delta, stderr = r["position_buckets"]["delta_vs_fp32"], r["position_buckets"]["delta_stderr"]
        grows = _rise(delta, stderr, 0, -1) > 0
        out.append({"config": r["config"], "grows": grows, "shrinks": _rise(delta, stderr, -1, 0) > 0,
                    "still_growing": (grows and _rise(delta, stderr, -2, -1) > 0) if len(delta) > 2 else None,
                    "first": (delta[0], stderr[0]), "last": (delta[-1], stderr[-1])})
    return out


def kl_growth(group: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per long-stream record with KL after fp32: ``{"config", "grows", "first", "last"}``: the last bucket's
    KL above the first's by more than twice the standard error of the difference (None with one stream)."""
    out = []
    for r in group[1:]:
        buckets = r.get("position_buckets") or {}
        if r.get("error") or "kl_stderr" not in buckets or len(buckets["kl_divergence"]) < 2:
            continue
        kl, stderr = buckets["kl_divergence"], buckets["kl_stderr"]
        noise = 2 * math.hypot(stderr[0], stderr[-1])
        out.append({"config": r["config"], "grows": kl[-1] - kl[0] > noise if math.isfinite(noise) else None,
                    "first": kl[0], "last": kl[-1]})
    return out

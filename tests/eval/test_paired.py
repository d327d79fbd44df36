"""Paired standard errors of Δ perplexity, Δ mean NLL and Δ recall vs a baseline: against direct computations on
tiny models (window by window, sequence by sequence), and how they shrink with more units."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from evalkit import word_text
from models import tiny_mamba

from gsq_hf.eval import decode_faithful_perplexity, make_windows
from gsq_hf.eval.paired import mean_stderr, nll_deltas, perplexity_delta, recall_delta
from gsq_hf.eval.recall import MQARSpec, recall_sweep

SPEC = MQARSpec(pairs=3, gap=4, queries=2, keys=16, values=16, filler=8)


def _run(model, windows, config, **options):
    return decode_faithful_perplexity(model, windows, config, progress=False, **options).to_dict()


def test_perplexity_delta_equals_a_direct_computation_window_by_window(model, tokenizer, text):
    """Each window scored alone (its own run, a fresh state) gives the ΣNLL the batched run keeps for it: windows
    are independent units; Δ and its standard error are then the plain mean and std/√n of per-window Δ NLL."""
    windows = make_windows(tokenizer, text, context=24, max_tokens=24 * 6)
    fp32, int3 = (_run(model, windows, c, batch_size=4) for c in ("fp32", "int3"))
    alone = {c: [_run(model, make_windows(tokenizer, " ".join(text.split()[24 * i : 24 * (i + 1)]), 24), c)
                 ["nll_sum"] for i in range(6)] for c in ("fp32", "int3")}
    # other batch sizes sum in other orders (Mamba2's chunked scan): equal to float rounding
    assert int3["window_nll_sum"] == pytest.approx(alone["int3"], rel=1e-7)
    assert fp32["window_nll_sum"] == pytest.approx(alone["fp32"], rel=1e-7)
    per_window = [(a - b) / 23 for a, b in zip(int3["window_nll_sum"], fp32["window_nll_sum"], strict=True)]
    delta = perplexity_delta(int3, fp32)
    assert delta["delta_nll"] == pytest.approx(statistics.fmean(per_window), rel=1e-9)
    assert delta["delta_nll_stderr"] == pytest.approx(statistics.stdev(per_window) / math.sqrt(6), rel=1e-9)
    assert delta["delta_stderr"] == pytest.approx(math.exp(delta["delta_nll"]) * delta["delta_nll_stderr"], rel=1e-12)
    assert delta["delta_nll_stderr"] > 0  # int3 moves the NLL of these windows by different amounts
    assert math.expm1(delta["delta_nll"]) == pytest.approx(int3["perplexity"] / fp32["perplexity"] - 1, rel=1e-9)
    assert perplexity_delta(fp32, fp32) == {"delta_nll": 0.0, "delta_nll_stderr": 0.0, "delta_stderr": 0.0}


def test_paired_stderr_shrinks_with_more_windows(tokenizer):
    """The same config pair on 4 and on 64 windows of one text: the standard error falls about as 1/√windows."""
    model, text = tiny_mamba(), word_text(64 * 32, seed=1)
    stderr = {}
    for count in (4, 64):
        windows = make_windows(tokenizer, text, context=32, max_tokens=32 * count)
        fp32, int3 = (_run(model, windows, c, batch_size=64) for c in ("fp32", "int3"))
        stderr[count] = perplexity_delta(int3, fp32)["delta_stderr"]
    assert 0 < stderr[64] < stderr[4] / 2  # √16 = 4 expected; half leaves room for the few windows' luck


def test_perplexity_delta_needs_the_same_windows():
    record = {"window_nll_sum": [1.0, 2.0], "tokens": 10}
    empty = dict.fromkeys(("delta_nll", "delta_nll_stderr", "delta_stderr"))
    assert perplexity_delta(record, {"window_nll_sum": [1.0, 2.0, 3.0], "tokens": 15}) == empty
    assert perplexity_delta(record, {"perplexity": 3.0, "tokens": 10}) == empty  # written without per-window sums
    one = perplexity_delta({"window_nll_sum": [2.0], "tokens": 5}, {"window_nll_sum": [1.0], "tokens": 5})
    assert one["delta_nll"] == pytest.approx(0.2) and math.isnan(one["delta_stderr"])  # one window: no spread


def test_nll_deltas_per_bucket_and_mean_stderr_by_hand():
    # two windows, two buckets of 2 and 4 tokens per window (tokens: all windows together)
    delta_nll, nll_stderr, delta, stderr = nll_deltas([[3.0, 4.0], [2.0, 4.0]], [[2.0, 4.0], [2.0, 4.0]], [4, 8])
    assert delta_nll.tolist() == pytest.approx([0.25, 0.0])  # per window: 0.5 and 0 nat per token
    assert nll_stderr.tolist() == pytest.approx([0.25, 0.0])  # std of (0.5, 0) / √2
    assert delta.tolist() == pytest.approx([math.expm1(0.25), 0.0])
    assert stderr.tolist() == pytest.approx([math.exp(0.25) * 0.25, 0.0])
    assert math.isnan(mean_stderr(torch.tensor([1.0])))


def test_recall_delta_by_hand():
    delta, stderr = recall_delta([2, 1, 2, 0], [2, 2, 2, 2], queries=8)  # 2 queries per sequence
    per_sequence = [0.0, -0.5, 0.0, -1.0]
    assert delta == pytest.approx(-3 / 8) == pytest.approx(statistics.fmean(per_sequence))
    assert stderr == pytest.approx(statistics.stdev(per_sequence) / 2)


def test_recall_sweep_deltas_are_paired_over_the_sequences():
    """The sweep's per-sequence hits add up to its counts, and its standard errors are the direct computation's:
    per gap over the sequences, and over all gaps with each sequence's answers at every gap as one unit."""
    result = recall_sweep(tiny_mamba(), SPEC, ["fp32", "int2"], gaps=[2, 8], num=24, batch_size=8)
    fp32, int2 = result["results"]
    for gap, g in int2["by_gap"].items():
        assert len(g["sequence_correct"]) == 24 and sum(g["sequence_correct"]) == g["correct"]
        diffs = [(a - b) / SPEC.queries for a, b in zip(g["sequence_correct"], fp32["by_gap"][gap]["sequence_correct"],
                                                        strict=True)]
        assert int2["delta_by_gap"][gap] == pytest.approx(statistics.fmean(diffs))
        assert int2["delta_stderr_by_gap"][gap] == pytest.approx(statistics.stdev(diffs) / math.sqrt(24))
    pooled = [sum((int2["by_gap"][gap]["sequence_correct"][i] - fp32["by_gap"][gap]["sequence_correct"][i])
                  for gap in ("2", "8")) / (2 * SPEC.queries) for i in range(24)]
    assert int2["delta_vs_first"] == pytest.approx(statistics.fmean(pooled))
    assert int2["delta_stderr"] == pytest.approx(statistics.stdev(pooled) / math.sqrt(24))
    assert fp32["delta_stderr"] == 0.0

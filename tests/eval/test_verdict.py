"""gsq_hf.eval.verdict: the front interpolated in bits, 'beats' only beyond noise, stream statistics."""

import math

import pytest

from gsq_hf.eval.verdict import (
    beats_front,
    binomial_stderr,
    bucket_deltas,
    bucket_kl_stderr,
    has_paired_stderr,
    interpolate_front,
    kl_growth,
    kl_verdicts,
    perplexity_verdicts,
    recall_verdicts,
    stream_growth,
)


def rec(config, family, bits, recall, policy="gate", queries=10_000):
    stderr = math.sqrt(recall * (1 - recall) / queries)
    return {"config": config, "family": family, "policy": policy, "avg_state_bits": bits, "recall": recall,
            "recall_stderr": stderr,
            "by_gap": {"32": {"recall": recall, "recall_stderr": stderr, "avg_state_bits": bits}}}


UNIFORM_POINTS = [rec("fp32", "uniform", 32.0, 0.999, "static"), rec("int8", "uniform", 8.5, 0.999, "static"),
                  rec("int4", "uniform", 4.5, 0.99, "static"), rec("int3", "uniform", 3.5, 0.95, "static")]


def test_recall_beats_the_front_only_beyond_two_standard_errors_and_inside_its_bits():
    records = UNIFORM_POINTS + [
        rec("int3-sr", "uniform-sr", 3.5, 0.99, "static"),  # static off the front: not judged by default
        rec("above", "g", 4.0, 0.99),  # the front at 4.0 bits: 0.97 → +2 points, well above noise
        rec("below", "g", 4.0, 0.96), rec("tie", "g", 4.0, 0.972),  # +0.2 points: within 2 standard errors
        rec("low", "g", 3.0, 0.999), rec("high", "g", 40.0, 0.999)]  # outside the front's bits: no verdict
    found = {v["config"]: v for v in beats_front(records, value="recall", higher_is_better=True,
                                                 stderr="recall_stderr")}
    assert set(found) == {"above", "below", "tie", "low", "high"}
    assert found["above"]["reference"] == pytest.approx(0.97) and found["above"]["gain"] == pytest.approx(0.02)
    assert found["above"]["noise"] == pytest.approx(2 * math.hypot(math.sqrt(0.99 * 0.01 / 1e4),
                                                                   math.hypot(0.5 * math.sqrt(0.99 * 0.01 / 1e4),
                                                                              0.5 * math.sqrt(0.95 * 0.05 / 1e4))))
    assert [found[c]["beats"] for c in ("above", "below", "tie")] == [True, False, False]
    assert found["below"]["gain"] == pytest.approx(-0.01) and found["above"]["front"] == "uniform"
    assert found["low"]["reference"] is None and found["low"]["beats"] is None and found["high"]["beats"] is None
    by_gap = recall_verdicts(records, [32])
    assert list(by_gap) == ["gap 32"] and [v["beats"] for v in by_gap["gap 32"]][:3] == [True, False, False]
    sr = beats_front(records, value="recall", higher_is_better=True, stderr="recall_stderr",
                     judged=lambda r: r["family"] == "uniform-sr")
    assert [(v["config"], v["beats"]) for v in sr] == [("int3-sr", True)]  # 0.99 vs the front's 0.95 at 3.5 bits


def test_interpolation_is_linear_in_bits_and_keeps_the_best_of_equal_bits():
    assert interpolate_front([(4.0, 1.0, 0.0), (8.0, 3.0, 0.0)], 5.0) == (1.5, 0.0)
    assert interpolate_front([(16.0, 0.5, 0.0), (16.0, 0.9, 0.0), (8.0, 0.1, 0.0)], 16.0)[0] == 0.5  # first wins
    assert interpolate_front([(4.0, 1.0, 0.3)], 4.0) == (1.0, 0.3)
    assert interpolate_front([(4.0, 1.0, 0.0), (8.0, 3.0, 0.0)], 9.0) is None


def test_perplexity_uses_a_margin_and_kl_the_log_scale():
    ppl = [{"config": c, "family": f, "gsq_config": {"policy": p}, "avg_state_bits": b, "delta_vs_fp32": d}
           for c, f, p, b, d in [("fp32", "uniform", "static", 32.0, 0.0), ("int8", "uniform", "static", 8.5, 0.0),
                                 ("int4", "uniform", "static", 4.5, 0.02), ("a", "g", "gate", 6.5, 0.0095),
                                 ("b", "g", "gate", 6.5, 0.0005)]]  # the front at 6.5 bits: +1.0%
    assert [(v["config"], v["beats"]) for v in perplexity_verdicts(ppl)] == [("a", False), ("b", True)]
    # with paired standard errors the noise is 2 of them, not the margin: a's 0.05 pp lead over the front (+1.0%)
    # beats an SE of 0.01 pp, b's 0.95 pp does not beat an SE of 0.5 pp
    stderr = {"fp32": 0.0, "int8": 1e-4, "int4": 1e-4, "a": 1e-4, "b": 5e-3}
    paired = [{**r, "delta_stderr": stderr[r["config"]]} for r in ppl]
    verdicts = perplexity_verdicts(paired)
    assert [(v["config"], v["beats"]) for v in verdicts] == [("a", True), ("b", False)]
    front = math.hypot(0.5e-4, 0.5e-4)  # the front at 6.5 bits: halfway between int4 and int8
    assert verdicts[0]["noise"] == pytest.approx(2 * math.hypot(1e-4, front))
    assert has_paired_stderr(paired) and not has_paired_stderr(ppl)
    assert not has_paired_stderr([{**r, "delta_stderr": math.nan} for r in paired])  # one window: no SE, margin
    kl = [{"config": c, "family": f, "policy": p, "avg_state_bits": b, "kl_divergence": k, "kl_stderr": e}
          for c, f, p, b, k, e in [("bf16", "uniform", "static", 16.0, 1e-6, 1e-7),
                                   ("int8", "uniform", "static", 10.0, 1e-4, 1e-6),
                                   ("int6", "uniform", "static", 8.0, 1e-2, 1e-4),  # at 9 bits: 1e-3 in log KL
                                   ("a", "g", "gate", 9.0, 0.9e-3, 0.4e-3),  # 1.1x lower, noise ~2.4x: no
                                   ("b", "g", "gate", 9.0, 0.2e-3, 1e-6),  # 5x lower: beats
                                   ("c", "g", "gate", 9.0, 0.0, 0.0)]]  # KL 0: no log, left out
    judged = kl_verdicts(kl)
    assert [v["config"] for v in judged] == ["a", "b"] and [v["beats"] for v in judged] == [False, True]
    assert [v["reference"] for v in judged] == pytest.approx([math.log(1e-3)] * 2)
    assert judged[1]["gain"] == pytest.approx(math.log(5.0))
    composed = kl + [{"config": "m4", "family": "composed", "policy": "static", "avg_state_bits": 9.0,
                      "kl_divergence": 1e-4, "kl_stderr": 1e-6}]
    assert [v["config"] for v in kl_verdicts(composed, front="composed")] == ["a", "b"]  # one point: 9.0 bits only
    assert [v["reference"] for v in kl_verdicts(composed, front="composed")] == pytest.approx([math.log(1e-4)] * 2)


def test_binomial_stderr_never_zero():
    assert binomial_stderr(100, 100) > 0.005
    assert binomial_stderr(50, 100) == pytest.approx(0.05)


def test_bucket_deltas_pool_the_streams_and_give_their_standard_error():
    fp32 = {"perplexity": [math.e, math.e], "tokens": [4, 8], "window_nll_sum": [[2.0, 4.0], [2.0, 4.0]]}
    mine = {"perplexity": [math.exp(1.25), math.e], "tokens": [4, 8], "window_nll_sum": [[2.0, 4.0], [3.0, 4.0]]}
    delta, stderr = bucket_deltas(mine, fp32)
    assert delta == pytest.approx([math.exp(0.25) - 1, 0.0])
    per_stream = [0.0, 0.5]  # Δ mean NLL: stream 1 has 1 nat more over its 2 tokens of the first bucket
    # std of two / √2, times exp(Δ mean NLL) (first order: Δ perplexity = exp(Δ mean NLL) - 1)
    assert stderr == pytest.approx([math.exp(0.25) * abs(per_stream[1] - per_stream[0]) / 2, 0.0])
    one = {key: value[:1] if key == "window_nll_sum" else value for key, value in fp32.items()}
    assert all(math.isnan(e) for e in bucket_deltas(one, one)[1])
    buckets = {"tokens": [4, 8], "window_kl_sum": [[0.2, 0.4], [0.6, 0.4]]}  # per-token KL [0.1, 0.1], [0.3, 0.1]
    assert bucket_kl_stderr(buckets) == pytest.approx([abs(0.3 - 0.1) / 2, 0.0])
    assert all(math.isnan(e) for e in bucket_kl_stderr({"tokens": [2, 4], "window_kl_sum": [[0.2, 0.4]]}))


def test_stream_growth_needs_more_than_a_tenth_of_a_point_and_twice_the_noise():
    def stream(config, delta, stderr=(0.0001, 0.0001, 0.0001)):
        return {"config": config, "delta_vs_fp32": 0.0,
                "position_buckets": {"delta_vs_fp32": list(delta), "delta_stderr": list(stderr)}}

    group = [stream("fp32", (0.0, 0.0, 0.0)), stream("int8", (0.0002, 0.0005, 0.0009)),  # rises < 0.1 pp
             stream("int4", (0.01, 0.05, 0.06)), stream("fp8", (0.01, 0.05, 0.05)),  # fp8 levels off
             stream("noisy", (0.01, 0.03, 0.03), (0.01, 0.01, 0.01)),  # +2 pp < 2 x √2 standard errors
             stream("x", (-0.03, 0.0, 0.001))]
    found = {g["config"]: g for g in stream_growth(group)}
    assert [c for c, g in found.items() if g["grows"]] == ["int4", "fp8"]
    assert [c for c, g in found.items() if g["shrinks"]] == ["x"]
    assert [c for c, g in found.items() if g["still_growing"]] == ["int4"]
    assert found["int4"]["first"] == (0.01, 0.0001) and found["int4"]["last"] == (0.06, 0.0001)
    two = stream_growth([group[0], stream("int8", (0.0, 0.002), (math.nan, math.nan))])
    assert two[0]["grows"] and two[0]["still_growing"] is None  # one stream: the margin alone; two buckets
    assert stream_growth([group[0], stream("int8", (0.01,))]) == []


def test_kl_growth_is_judged_against_the_standard_error_of_the_difference():
    def stream(config, kl, stderr):
        return {"config": config, "position_buckets": {"kl_divergence": list(kl), "kl_stderr": list(stderr)}}

    group = [{"config": "fp32"}, stream("int8", (1e-5, 4e-5), (1e-6, 1e-6)),
             stream("int4", (1e-2, 1.1e-2), (1e-3, 1e-3)), stream("one", (1e-5, 4e-5), (math.nan, math.nan)),
             {"config": "failed", "error": "NaN"}]
    assert [(g["config"], g["grows"]) for g in kl_growth(group)] == [("int8", True), ("int4", False), ("one", None)]

"""gsq_hf.eval.sweep: the grid, and a small sweep's records (numbers and structure) on the built-in models."""

import math
from pathlib import Path

import pytest

import gsq_hf
from gsq_hf.config import resolve_config
from gsq_hf.eval.data import EvalInputError
from gsq_hf.eval.sweep import (
    COMPOSED,
    CONFIGS,
    FAMILIES,
    LONG_STREAM,
    UNIFORM,
    SweepInputError,
    SweepOptions,
    _cut_streams,
    long_stream_configs,
    run_sweep,
    select_configs,
    sweep_size,
)

ASSETS = Path(gsq_hf.__file__).parent / "assets"


def test_grid_names_are_unique_fp32_first_and_the_composed_front_holds_the_presets():
    names = [resolve_config(c).name for _, c in CONFIGS]
    assert names[0] == "fp32" and len(set(names)) == len(names)
    composed = {cfg.name: cfg for family, cfg in select_configs([COMPOSED])[1:]}
    assert {"gsq-4bit", "gsq-3bit", "midrise4-e4m3-hadamard", "midrise3-e4m3-hadamard-sr"} <= set(composed)
    assert all(cfg.policy.kind == "static" for cfg in composed.values())
    assert composed["gsq-3bit"].to_dict() == {**resolve_config("gsq-3bit").to_dict()}
    mixes = [cfg for family, cfg in select_configs() if family.endswith("midrise3-e4m3-hadamard/int8")]
    assert {cfg.policy.kind for cfg in mixes} == {"gate", "budget"} and all(
        cfg.policy.low == "midrise3-e4m3-hadamard" for cfg in mixes)
    assert [c.name for _, c in select_configs(["uniform-sr"])] == ["fp32", "int4-sr", "int3-sr"]
    with pytest.raises(EvalInputError, match="unknown families 'nope'; known: uniform, uniform-sr, composed"):
        select_configs(["nope"])
    streams = [cfg.name for _, cfg in long_stream_configs(select_configs())]
    assert streams == [n for n in names if n in LONG_STREAM] and set(streams) == set(LONG_STREAM)
    assert FAMILIES[:3] == [UNIFORM, "uniform-sr", COMPOSED]


def test_sweep_size_counts_every_config_run():
    options = SweepOptions(datasets=["builtin", "builtin"], families=["uniform-sr"], recall_num=8,
                           recall_models=[str(ASSETS / "recall-mamba")])
    assert sweep_size(options) == 2 * 3 + 1 + 3  # datasets x configs, fp32's long stream, recall
    options.long_stream_tokens, options.recall_num = 0, 0
    assert sweep_size(options) == 6


def test_long_streams_unset_are_as_long_as_the_text_holds_them():
    """``gsq-hf sweep`` with no options runs on the built-in text (about 10k tokens): its long streams are cut
    to fit 8 streams; a length set by the user is kept or refused, never shortened."""
    from gsq_hf.eval.data import load_text, load_tokenizer

    tokenizer, text = load_tokenizer(str(ASSETS / "tiny-mamba-pydoc")), load_text("builtin")
    available = len(tokenizer.encode(text, add_special_tokens=False))
    assert available < 8 * 16384
    streams = _cut_streams(tokenizer, text, SweepOptions(), "builtin")
    assert streams.ids.shape == (8, available // 8)
    assert _cut_streams(tokenizer, text, SweepOptions(long_stream_tokens=500), "builtin").ids.shape == (8, 500)
    with pytest.raises(SweepInputError, match="long streams of 16384 tokens from builtin: context 16384"):
        _cut_streams(tokenizer, text, SweepOptions(long_stream_tokens=16384), "builtin")
    with pytest.raises(SweepInputError, match="long streams of up to 16384 tokens from x: .* fewer"):
        _cut_streams(tokenizer, "a b", SweepOptions(long_stream_streams=8), "x")


@pytest.mark.slow
def test_a_small_sweep_gives_every_record_its_numbers():
    options = SweepOptions(families=["uniform-sr", COMPOSED], context=64, max_tokens=256, kl_top_k=16,
                           trace_tokens=12, long_stream_tokens=300, long_stream_streams=2, recall_num=4,
                           recall_gaps=[32], recall_models=[str(ASSETS / "recall-mamba2")])
    started = []
    payload = run_sweep(options, started=started.append)
    configs = [cfg.name for _, cfg in select_configs(options.families)]
    assert payload["configs"] == configs and len(started) == sweep_size(options)
    assert started[0] == "tiny-mamba-pydoc / builtin / fp32"
    records = payload["records"]
    assert [r["config"] for r in records] == configs
    fp32 = records[0]
    assert fp32["delta_vs_fp32"] == 0.0 and "kl_divergence" not in fp32 and fp32["windows"] == 4
    for r in records[1:]:
        assert r["delta_vs_fp32"] == pytest.approx(r["perplexity"] / fp32["perplexity"] - 1)
        assert r["kl_divergence"] > 0 and 0 <= r["top1_agreement"] <= 1 and r["evaluation"] == "chunked"
        assert r["tokens"] == fp32["tokens"] == 4 * 63
    bits = {r["config"]: r["avg_state_bits"] for r in records}
    assert bits["gsq-4bit"] == pytest.approx(4.5, abs=0.02) and bits["gsq-3bit"] == pytest.approx(3.5, abs=0.02)
    (reference,) = payload["references"]
    assert reference["perplexity"] == pytest.approx(fp32["perplexity"], rel=1e-4)  # fp32 storage = unpatched

    fronts = {(v["metric"], v["front"]): v["verdicts"] for v in payload["verdicts"] if v.get("dataset")}
    assert set(fronts) == {("perplexity", "uniform"), ("kl", "uniform"), ("perplexity", COMPOSED),
                           ("kl", COMPOSED)}
    judged = [v["config"] for v in fronts[("perplexity", "uniform")]]
    assert judged == [c for c, r in zip(configs, records, strict=True) if r["family"] == COMPOSED]
    assert fronts[("perplexity", COMPOSED)] == []  # no dynamic config in these families
    for v in fronts[("kl", "uniform")]:
        if v["reference"] is not None:
            assert v["beats"] == (v["gain"] > v["noise"]) and v["noise"] >= 0

    (trace,) = payload["traces"]
    assert trace["config"] == "gsq-gate" and len(trace["tokens"]) == 12
    assert len(trace["high_fraction"]) == len(trace["layers"]) and all(
        len(row) == 12 and all(0.0 <= x <= 1.0 for x in row) for row in trace["high_fraction"])

    streams = payload["long_stream"]
    assert [r["config"] for r in streams] == ["fp32", "gsq-4bit", "gsq-3bit"]
    for r in streams:
        buckets = r["position_buckets"]
        assert r["streams"] == 2 and buckets["starts"] == [0, 256] and buckets["tokens"] == [2 * 255, 2 * 44]
        assert math.isclose(sum(buckets["nll_sum"]), r["nll_sum"], rel_tol=1e-12)
        assert len(buckets["delta_stderr"]) == 2 and all(math.isfinite(x) for x in buckets["delta_stderr"])
    assert streams[0]["position_buckets"]["delta_vs_fp32"] == [0.0, 0.0]

    (recall,) = payload["recall"]
    assert recall["model"] == "recall-mamba2" and recall["gaps"] == [32]
    assert [r["config"] for r in recall["results"]] == configs and recall["results"][0]["delta_vs_fp32"] == 0.0
    for r in recall["results"]:
        assert r["queries"] == 4 * 8 and 0 < r["recall_stderr"] < 1 and r["family"] in ("uniform", *options.families)
    assert {(v["metric"], v["front"]) for v in payload["verdicts"] if not v.get("dataset")} == {
        ("recall", "uniform"), ("recall", COMPOSED)}

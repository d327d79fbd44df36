"""scripts/results.py runs end to end on the built-in model with a small budget (its numbers are not asserted,
only that they exist, are finite and that fp32 is the Δ baseline), long streams included."""

import itertools
import json
import math
import os
import re
from pathlib import Path

import pytest
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
LAMBADA = ROOT.parent / "shared" / "data" / "lambada" / "lambada_test.jsonl"
RECALL_MODEL = ROOT / "gsq_hf" / "assets" / "recall-mamba2"
# the CI run: the uniform curve, one family from the seed grid and one low-bit dynamic family
FAMILIES = "uniform,gate-open int8/fp16,gate-closed int3/int8"




def rows_of(section: str) -> list[list[str]]:
    """The data rows of the (first) table in ``section``."""
    lines = list(itertools.takewhile(lambda line: line.startswith("|"),
                                     itertools.dropwhile(lambda line: not line.startswith("|"), section.splitlines())))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]  # skip header, rule


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The data rows of the table under ``### heading``."""
    return rows_of(markdown.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0])


@pytest.mark.slow
def test_results_pipeline(tmp_path):
    script = load_script("results")
    args = ["--dataset", "builtin", "--max-tokens", "256", "--context", "64", "--lambada-examples", "4",
            "--trace-tokens", "24", "--long-stream-tokens", "300", "--long-stream-streams", "2",
            "--families", FAMILIES, "--recall-model", str(RECALL_MODEL), "--recall-num", "8",
            "--recall-gaps", "32", "--threads", "1", "--no-progress", "--out", str(tmp_path)]
    with_lambada = LAMBADA.is_file()
    if with_lambada:
        args += ["--dataset", str(LAMBADA)]
    elif os.environ.get("CI") == "true":
        pytest.fail(f"{LAMBADA} is missing on CI")
    payload = script.main(args)

    all_names = [script.resolve_config(config).name for _, config in script.CONFIGS]
    assert all_names[0] == "fp32" and len(set(all_names)) == len(all_names)
    selected = script.select_configs(FAMILIES.split(","))
    names = [script.resolve_config(config).name for _, config in selected]
    assert names[:11] == ["fp32", "bf16", "fp16", "fp8", "int8", "int7", "int6", "int5", "int4", "int3", "int2"]
    assert len(names) == 17
    datasets = ["builtin"] + (["lambada_test"] if with_lambada else [])
    for name in ["results.md", "results.json", "trace-tiny-mamba-pydoc.png", "long-stream-tiny-mamba-pydoc.png",
                 "long-stream-kl-tiny-mamba-pydoc.png", "recall-pareto-recall-mamba2.png",
                 *(f"pareto-tiny-mamba-pydoc-{script.slug(d)}.png" for d in datasets)]:
        assert (tmp_path / name).stat().st_size > 0, name

    markdown = (tmp_path / "results.md").read_text()
    assert "python scripts/results.py" in markdown and "torch" in markdown
    for dataset in datasets:
        rows = table_rows(markdown, f"tiny-mamba-pydoc — {dataset}")
        assert [row[0] for row in rows] == names  # one row per config, in grid order
        fp32 = rows[0]
        assert fp32[-5:-2] == ["+0.000%", "-", "-"]  # Δ vs fp32 of fp32 itself; no KL or top-1 vs itself
        for row in rows:
            kl, top1 = row[-4:-2]
            if row is not fp32:
                assert re.fullmatch(r"\d\.\d\de-\d\d ± \d\.\de-\d\d", kl) and float(kl.split()[0]) > 0, row
                assert 0 <= float(top1.rstrip("%")) <= 100, row
            row = row[:-4] + row[-2:]
            numbers = [cell for cell in row[2:] if re.fullmatch(r"[-+]?[\d,]*\.?\d+%?", cell)]
            assert len(numbers) == len(row) - 2, row  # no "-", no FAILED, no nan
            assert all(math.isfinite(float(cell.rstrip("%").replace(",", ""))) for cell in numbers), row

    records = payload["records"]
    assert len(records) == len(names) * len(datasets)
    for record in records:
        assert not record.get("error")
        keys = ["perplexity", "word_perplexity", "avg_state_bits", "state_bytes", "delta_vs_fp32"]
        if record["dataset"] == "lambada_test":
            keys += ["lambada_accuracy", "lambada_perplexity"]
            assert record["lambada_examples"] == 4 and 0.0 <= record["lambada_accuracy"] <= 1.0
        assert all(math.isfinite(record[key]) for key in keys), record
        if record["config"] == "fp32":
            assert record["delta_vs_fp32"] == 0.0 and "kl_divergence" not in record
        else:
            assert record["kl_divergence"] > 0 and 0 <= record["top1_agreement"] <= 1
    check_long_streams(script, markdown, payload)
    check_recall(markdown, payload, names)
    for dataset in datasets:
        for metric in ("perplexity", "KL vs fp32"):
            assert re.search(rf"\*\*Beats uniform at equal bits — tiny-mamba-pydoc — {dataset} \({metric}\):\*\* "
                             r"(none|\S+@)", markdown)
    answers = markdown.split("### tiny-mamba-pydoc — the questions, answered", 1)[1].split("###", 1)[0]
    assert re.search(r"\*\*Is int8 static state quantization lossless .*\*\* (Yes|No): builtin [-+]\d", answers)
    assert "**The GSQ seed: gate-closed states go to int8" in answers  # gate-open@0.3 is in FAMILIES
    assert "**The entropy seed" not in answers  # entropy@0.5 is not: no sentence without its numbers
    if not with_lambada:
        pytest.skip(f"LAMBADA part skipped: {LAMBADA} is absent (the built-in part passed)")


def test_lambada_split_and_padding_rows_are_independent():
    """A row's LAMBADA score does not depend on the other rows of its batch (right padding, per-row policies)."""
    import torch

    from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR
    from gsq_hf.eval.data import load_model, load_tokenizer

    script = load_script("results")
    model, tokenizer = load_model(BUILTIN_MODEL_DIR), load_tokenizer(BUILTIN_MODEL_DIR)
    texts = ["The quick brown fox jumps over the lazy dog", "def f(x): return x"]
    pairs = script.lambada_tokens(tokenizer, texts)
    assert tokenizer.decode(pairs[0][1]).strip() == "dog"
    torch.manual_seed(0)
    for config in ("int4", "gsq-entropy"):
        together = script.lambada_score(model, pairs, config, batch_size=2)
        alone = [script.lambada_score(model, [pair], config, batch_size=1) for pair in pairs]
        mean = sum(math.log(a["lambada_perplexity"]) for a in alone) / 2
        assert math.isclose(math.log(together["lambada_perplexity"]), mean, rel_tol=1e-5)
        assert together["lambada_accuracy"] == sum(a["lambada_accuracy"] for a in alone) / 2


def check_recall(markdown: str, payload: dict, names: list[str]) -> None:
    """8 sequences at gap 32 on recall-mamba2: table rows, summary sentence, verdict, JSON records."""
    rows = table_rows(markdown, "recall-mamba2 — recall")
    assert [row[0] for row in rows] == names
    assert rows[0][2:] == ["32.00", rows[0][3], rows[0][3], "+0.00", "+0.00"] and float(rows[0][3]) >= 95.0
    assert "| config | family | avg bits | recall % | gap 32 % | Δ vs fp32 (points) | Δ gap 32 |" in markdown
    assert re.search(r"\*\*recall-mamba2 recall:\*\* gap 32 \(training gap\): fp32 [\d.]+%, int8 [\d.]+%, "
                     r"int4 [\d.]+%, int3 [\d.]+%; (best dynamic at ≤ 4 bits \S+ [\d.]+%|no dynamic config)"
                     r".*; gap 128: not measured", markdown)
    assert re.search(r"\*\*Beats uniform at equal bits — recall-mamba2, gap 32 \(recall\):\*\* (none|\S+@)",
                     markdown)
    (recall,) = payload["recall"]
    assert recall["model"] == "recall-mamba2" and recall["gaps"] == [32] and recall["num"] == 8
    records = recall["results"]
    assert [r["config"] for r in records] == names and records[0]["delta_vs_fp32"] == 0.0
    for r in records:
        assert r["queries"] == 64 and 0.0 <= r["recall"] <= 1.0 and math.isfinite(r["avg_state_bits"])
        assert r["family"] in FAMILIES.split(",") and math.isfinite(r["recall_stderr"])
    assert {v["metric"] for v in payload["verdicts"]} == {"perplexity", "kl", "recall"}


def test_uniform_verdict_interpolates_in_bits_and_needs_more_than_noise():
    script = load_script("results")

    def rec(config, family, bits, recall, policy="gate", queries=10_000):
        return {"config": config, "family": family, "policy": policy, "avg_state_bits": bits, "recall": recall,
                "recall_stderr": math.sqrt(recall * (1 - recall) / queries)}

    uniform = [rec("fp32", "uniform", 32.0, 0.999, "static"), rec("int8", "uniform", 8.5, 0.999, "static"),
               rec("int4", "uniform", 4.5, 0.99, "static"), rec("int3", "uniform", 3.5, 0.95, "static"),
               rec("int3-sr", "uniform-sr", 3.5, 0.99, "static")]  # not on the curve, not judged
    records = uniform + [rec("above", "g", 4.0, 0.99),  # uniform at 4.0 bits: 0.97 → +2 points, well above noise
                         rec("below", "g", 4.0, 0.96),
                         rec("tie", "g", 4.0, 0.972),  # +0.2 points: within 2 standard errors
                         rec("low", "g", 3.0, 0.999), rec("high", "g", 40.0, 0.999)]  # outside: no verdict
    verdicts = {v["config"]: v for v in script.beats_uniform(records, value="recall", higher_is_better=True,
                                                            stderr="recall_stderr")}
    assert set(verdicts) == {"above", "below", "tie", "low", "high"}
    assert verdicts["above"]["uniform"] == pytest.approx(0.97) and verdicts["above"]["gain"] == pytest.approx(0.02)
    assert verdicts["above"]["beats"] and not verdicts["below"]["beats"] and not verdicts["tie"]["beats"]
    assert verdicts["below"]["gain"] == pytest.approx(-0.01)
    assert verdicts["low"]["uniform"] is None and verdicts["low"]["beats"] is None
    assert verdicts["high"]["beats"] is None
    assert script.binomial_stderr(100, 100) > 0.005  # no miss still carries its sample's noise
    assert script.binomial_stderr(50, 100) == pytest.approx(0.05)
    points = lambda x: f"{100 * x:+.2f} points"  # noqa: E731
    sentence = script.verdict_sentence("m, gap 32 (recall)", list(verdicts.values()), points, "noise")
    assert sentence.startswith("**Beats uniform at equal bits — m, gap 32 (recall):** above (4.00 bits: +2.00 "
                               "points better than the interpolated uniform, noise ")
    assert sentence.endswith("No verdict outside the uniform range of bits: low, high.")
    none = script.verdict_sentence("m", [verdicts["below"]], points, "noise")
    assert "** none (closest: below, 4.00 bits, -1.00 points better vs noise" in none

    # perplexity: lower Δ is better, a 0.1 percentage point margin instead of a standard error
    ppl = [{"config": c, "family": f, "gsq_config": {"policy": p}, "avg_state_bits": b, "delta_vs_fp32": d}
           for c, f, p, b, d in [("fp32", "uniform", "static", 32.0, 0.0), ("int8", "uniform", "static", 8.5, 0.0),
                                 ("int4", "uniform", "static", 4.5, 0.02), ("a", "g", "gate", 6.5, 0.0095),
                                 ("b", "g", "gate", 6.5, 0.0005)]]  # uniform at 6.5 bits: +1.0%
    sentence, judged = script.perplexity_verdict("m — d", ppl)
    assert [v["beats"] for v in judged] == [False, True]  # a: 0.05 pp better (< 0.1); b: 0.95 pp better
    assert "** b (6.50 bits: 0.95 pp better" in sentence

    # KL: lower is better, the uniform curve interpolated in log KL, noise from each record's standard error
    kl = [{"config": c, "family": f, "gsq_config": {"policy": p}, "avg_state_bits": b, "kl_divergence": k,
           "kl_stderr": e}
          for c, f, p, b, k, e in [("bf16", "uniform", "static", 16.0, 1e-6, 1e-7),
                                   ("int8", "uniform", "static", 10.0, 1e-4, 1e-6),
                                   ("int6", "uniform", "static", 8.0, 1e-2, 1e-4),  # at 9 bits: 1e-3 in log KL
                                   ("a", "g", "gate", 9.0, 0.9e-3, 0.4e-3),  # 1.1x lower, noise ~2.4x: no
                                   ("b", "g", "gate", 9.0, 0.2e-3, 1e-6),  # 5x lower: beats
                                   ("c", "g", "gate", 9.0, 0.0, 0.0)]]  # KL 0: no log, left out
    sentence, judged = script.kl_verdict("m — d", kl)
    assert [v["config"] for v in judged] == ["a", "b"]
    assert [v["uniform"] for v in judged] == pytest.approx([math.log(1e-3)] * 2)  # geometric mean of neighbours
    assert [v["beats"] for v in judged] == [False, True]
    assert judged[1]["gain"] == pytest.approx(math.log(5.0))
    assert "** b (9.00 bits: a factor 5.00 in KL better than the interpolated uniform" in sentence


def check_long_streams(script, markdown: str, payload: dict) -> None:
    """2 streams of 300 builtin tokens: buckets 1–255 and 256–299, Δ vs fp32 per bucket, the answer sentence."""
    names = [cfg.name for _, cfg in script.long_stream_configs(script.select_configs(FAMILIES.split(",")))]
    assert names == ["fp32", "bf16", "fp16", "int8", "int4", "int3", "gate-open@0.3"]
    rows = table_rows(markdown, "tiny-mamba-pydoc — long streams of builtin")
    assert [row[0] for row in rows] == names
    assert rows[0][3:] == ["+0.000%"] + ["+0.000 ± 0.000%"] * 2  # fp32: all positions, 1–255, 256–299
    for row in rows:
        assert re.fullmatch(r"[-+]\d+\.\d{3}%", row[3]), row  # all positions, pooled
        assert all(re.fullmatch(r"[-+]\d+\.\d{3} ± \d+\.\d{3}%", cell) for cell in row[4:]), row
    assert "| config | family | avg state bits | all positions | 1–255 | 256–299 |" in markdown
    assert re.search(r"\*\*Does the error grow with sequence length\?\*\* (Yes for|No)", markdown)
    assert payload["long_stream_tokens"] == 300 and payload["long_stream_dataset"] == "builtin"
    records = payload["long_stream"]
    assert [r["config"] for r in records] == names
    for record in records:
        buckets = record["position_buckets"]
        assert record["streams"] == 2 and buckets["starts"] == [0, 256] and buckets["ends"] == [256, 300]
        assert buckets["tokens"] == [2 * 255, 2 * 44] and sum(buckets["tokens"]) == record["tokens"]
        assert math.isclose(sum(buckets["nll_sum"]), record["nll_sum"], rel_tol=1e-12)
        assert all(math.isfinite(d) for d in buckets["delta_vs_fp32"] + buckets["delta_stderr"])
        assert len(buckets["window_nll_sum"]) == 2
    assert records[0]["position_buckets"]["delta_vs_fp32"] == [0.0, 0.0]
    kl_rows = rows_of(markdown.split("KL(fp32 ‖ config) per token", 1)[1].split("**Does the divergence", 1)[0])
    assert [row[0] for row in kl_rows] == names[1:]  # fp32 is the reference
    for row, record in zip(kl_rows, records[1:], strict=True):
        assert all(re.fullmatch(r"\d\.\d\de-\d\d ± \d\.\de-\d\d", cell) for cell in row[2:]), row
        buckets = record["position_buckets"]
        assert math.isclose(sum(map(sum, buckets["window_kl_sum"])), record["kl_divergence"] * record["tokens"])
        assert len(buckets["kl_stderr"]) == 2
    assert re.search(r"\*\*Does the divergence from fp32 grow with sequence length\?\*\* (It grows for|No config)",
                     markdown)


def test_long_stream_configs_are_the_chosen_uniform_formats_and_one_per_dynamic_family():
    script = load_script("results")
    chosen = script.long_stream_configs()
    uniform = [script.resolve_config(c).name for family, c in script.CONFIGS if family == script.UNIFORM]
    assert set(script.LONG_STREAM_UNIFORM) <= set(uniform)
    assert [cfg.name for _, cfg in chosen] == list(script.LONG_STREAM_UNIFORM) + list(script.LONG_STREAM_DYNAMIC)
    dynamic = [family for family, _ in chosen if family != script.UNIFORM]
    assert len(set(dynamic)) == len(dynamic) == len(script.LONG_STREAM_DYNAMIC)  # one per seed family
    assert script.long_stream_dataset(["x/lambada_test.jsonl", "wiki.test.raw"]) == "wiki.test.raw"


def test_growth_sentence_states_the_verdict_with_the_numbers():
    script = load_script("results")

    def rec(config, delta, stderr=(0.0001, 0.0001, 0.0001)):
        return {"config": config, "streams": 8, "delta_vs_fp32": 0.0,
                "position_buckets": {"delta_vs_fp32": list(delta), "delta_stderr": list(stderr)}}

    labels = ["1–255", "256–999", "1000–4999"]
    group = [rec("fp32", (0.0, 0.0, 0.0)), rec("int8", (0.0002, 0.0005, 0.0009)),  # rises < 0.1 pp
             rec("int4", (0.01, 0.05, 0.06)), rec("fp8", (0.01, 0.05, 0.05)),  # fp8 levels off
             rec("noisy", (0.01, 0.03, 0.03), (0.01, 0.01, 0.01)),  # +2 pp, but 2 x √2 standard errors = 2.8 pp
             rec("x", (-0.03, 0.0, 0.001))]
    sentence = script.growth_sentence(group, labels)
    assert sentence.startswith("**Does the error grow with sequence length?** Yes for int4, fp8; it shrinks for "
                               "x; still growing between the last two buckets: int4. Growth: |Δ| rises by more "
                               "than 0.1 percentage point and more than twice its standard error over the 8 streams.")
    assert ("positions 1–255 → 1000–4999: int8 +0.020 ± 0.010% → +0.090 ± 0.010%; int4 +1.000 ± 0.010% → "
            "+6.000 ± 0.010%; fp8 ") in sentence and sentence.endswith("x -3.000 ± 0.010% → +0.100 ± 0.010%.")
    assert "** No. Growth" in script.growth_sentence(group[:2], labels)
    assert "Not measured: fewer than two" in script.growth_sentence(group, ["1–255"])
    one_stream = rec("int8", (0.0, 0.002), (math.nan, math.nan))
    two_buckets = script.growth_sentence([group[0], one_stream], labels[:2])
    assert "Yes for int8. Growth" in two_buckets  # no "still growing" clause: the last two are the first and last
    assert script._pct(0.0123, math.nan) == "+1.230%"


def test_kl_growth_sentence_and_the_stream_standard_error():
    script = load_script("results")
    # 2 streams with 2 and 4 tokens in the two buckets: mean KL per token [0.1, 0.1] and [0.3, 0.1]
    buckets = {"tokens": [4, 8], "window_kl_sum": [[0.2, 0.4], [0.6, 0.4]]}
    assert script.bucket_kl_stderr(buckets) == pytest.approx([abs(0.3 - 0.1) / 2, 0.0])  # std of two / √2
    assert all(math.isnan(e) for e in script.bucket_kl_stderr({"tokens": [2, 4], "window_kl_sum": [[0.2, 0.4]]}))

    def rec(config, kl, stderr):
        return {"config": config, "streams": 2, "kl_divergence": sum(kl) / 2,
                "position_buckets": {"kl_divergence": list(kl), "kl_stderr": list(stderr)}}

    labels = ["1–255", "256–1023"]
    group = [{"config": "fp32"}, rec("int8", (1e-5, 4e-5), (1e-6, 1e-6)), rec("int4", (1e-2, 1.1e-2), (1e-3, 1e-3))]
    sentence = script.kl_growth_sentence(group, labels)
    assert sentence.startswith("**Does the divergence from fp32 grow with sequence length?** It grows for int8: ")
    assert "int8 1.00e-05 → 4.00e-05 (x4.00); int4 1.00e-02 → 1.10e-02 (x1.10)." in sentence  # int4: within noise
    assert "No config's KL grows" in script.kl_growth_sentence(group[::2], labels)
    one = [group[0], rec("int8", (1e-5, 4e-5), (math.nan, math.nan))]
    assert "Not judged (one stream" in script.kl_growth_sentence(one, labels)
    assert "Not measured" in script.kl_growth_sentence([group[0], {"config": "x", "error": "NaN"}], labels)


def test_bucket_deltas_pool_the_streams_and_give_their_standard_error():
    script = load_script("results")
    fp32 = {"perplexity": [math.e, math.e], "tokens": [4, 8], "window_nll_sum": [[2.0, 4.0], [2.0, 4.0]]}
    mine = {"perplexity": [math.exp(1.25), math.e], "tokens": [4, 8], "window_nll_sum": [[2.0, 4.0], [3.0, 4.0]]}
    delta, stderr = script.bucket_deltas(mine, fp32)
    assert delta == pytest.approx([math.exp(0.25) - 1, 0.0])
    per_stream = [0.0, math.exp(0.5) - 1]  # stream 1: 1 nat more over its 2 tokens of the first bucket
    assert stderr == pytest.approx([abs(per_stream[1] - per_stream[0]) / 2, 0.0])  # std of two / √2
    one = {key: value[:1] if key == "window_nll_sum" else value for key, value in fp32.items()}
    assert all(math.isnan(e) for e in script.bucket_deltas(one, one)[1])


def test_model_provenance_states_training_and_wikitext_from_training_info(tmp_path):
    script = load_script("results")
    assert script.model_provenance(str(tmp_path)) is None  # no training_info.json: nothing claimed
    assert script.model_provenance("state-spaces/mamba-130m-hf") is None
    info = {"model": "MambaForCausalLM", "parameters": 14_624_000, "steps": 151, "tokens_seen": 309_248,
            "train_time_s": 2115.7, "device": "cpu", "history": [{"step": 151, "heldout_loss": 7.2712}],
            "wikitext2_test": {"token_perplexity": 4371.19, "word_perplexity": 15961.32, "scored_tokens": 8160},
            "command": "python scripts/train_reference.py --family mamba --preset cpu"}
    (tmp_path / "training_info.json").write_text(json.dumps(info))
    sentence = script.model_provenance(str(tmp_path))
    assert "14.62M parameters; trained 151 steps (0.31M tokens, 35 min on cpu)" in sentence
    assert "held-out loss 7.271 (perplexity 1438.3)" in sentence
    assert "WikiText-2 test perplexity 4371.2 per token, 15961.3 per word" in sentence
    assert script.PUBLISHED_MAMBA_130M in sentence and "`python scripts/train_reference.py" in sentence
    builtin = script.model_provenance(str(script.BUILTIN_MODEL_DIR))
    assert "held-out loss" in builtin and script.PUBLISHED_MAMBA_130M not in builtin  # not a WikiText model


def test_seed_configs_are_the_presets_and_questions_are_answered_from_the_records():
    script = load_script("results")
    grid = {script.resolve_config(c).name: script.resolve_config(c) for _, c in script.CONFIGS}
    for preset, config in script.SEED_CONFIGS.items():
        ours, theirs = grid[config].to_dict(), script.resolve_config(preset).to_dict()
        ours.pop("name"), theirs.pop("name")
        assert ours == theirs, preset

    def rec(config, delta, bits, acc=None):
        return {"config": config, "delta_vs_fp32": delta, "avg_state_bits": bits, "lambada_accuracy": acc}

    groups = {"wiki": [rec("fp32", 0.0, 32), rec("int8", 0.0004, 10), rec("gate-open@0.3", 0.0002, 11.6),
                       rec("entropy@0.5", 0.004, 12.0)],
              "lambada": [rec("fp32", 0.0, 32, 0.25), rec("int8", 0.002, 10, 0.24),
                          rec("gate-open@0.3", 0.0001, 11.6, 0.25), rec("entropy@0.5", 0.01, 12.0, 0.2)]}
    judged = {"wiki": [{"config": "x@1", "uniform": 0.01, "beats": True, "gain": 0.003, "bits": 6.5},
                       {"config": "y@1", "uniform": 0.01, "beats": False, "gain": 0.0, "bits": 7.0},
                       {"config": "z@1", "uniform": None, "beats": None, "gain": None, "bits": 3.0}],
              "lambada": []}
    judged_kl = {"wiki": [{"config": "x@1", "uniform": -9.0, "beats": False, "gain": -0.5, "bits": 6.5}],
                 "lambada": [{"config": "y@1", "uniform": -9.0, "beats": True, "gain": math.log(2.0), "bits": 7.0}]}
    groups["wiki"][1]["kl_divergence"], groups["wiki"][1]["top1_agreement"] = 2.5e-6, 0.999
    text = "\n".join(script.questions_section("m", groups, judged, judged_kl))
    assert "No: wiki +0.040%, KL 2.50e-06 nats/token, top-1 agreement 99.90%; lambada +0.200%" in text
    assert ("more than 2 standard errors — wiki: 0 of 1; lambada: 1 of 1 (largest: y@1, a factor 2.00 at 7.00 "
            "bits)") in text
    assert "Where the two disagree, trust the KL" in text
    text = "\n".join(script.questions_section("m", groups, judged))  # without KL: no KL sentence
    assert ("(|Δ perplexity| below 0.1%)?** No: wiki +0.040%, KL 2.50e-06 nats/token, top-1 agreement 99.90%; "
            "lambada +0.200% (LAMBADA accuracy 24.0% vs 25.0%).") in text  # lambada's int8 is 0.2% off: not lossless
    assert "In KL vs fp32" not in text
    assert "wiki: 1 of 2 (largest: x@1, 0.30 pp at 6.50 bits); lambada: 0 of 0." in text
    assert "wiki: Δ +0.020% at 11.60 bits vs uniform int8 +0.040% at 10.00 bits" in text
    assert "The claim holds at the 0.1% bar" in text
    assert "wiki: 12.00 bits = 25% less state traffic than an fp16 state, Δ +0.400%; uniform int8 38% less" in text

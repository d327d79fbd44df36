"""scripts/results.py runs end to end on the built-in model with a small budget (its numbers are not asserted,
only that they exist, are finite and that fp32 is the Δ baseline), long streams included."""

import importlib.util
import math
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAMBADA = ROOT.parent / "shared" / "data" / "lambada" / "lambada_test.jsonl"


def load_script():
    spec = importlib.util.spec_from_file_location("results_script", ROOT / "scripts" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The data rows of the table under ``### heading``."""
    section = markdown.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # skip the header


@pytest.mark.slow
def test_results_pipeline(tmp_path):
    script = load_script()
    args = ["--dataset", "builtin", "--max-tokens", "256", "--context", "64", "--lambada-examples", "4",
            "--trace-tokens", "24", "--long-stream-tokens", "300", "--long-stream-streams", "2",
            "--threads", "1", "--no-progress", "--out", str(tmp_path)]
    with_lambada = LAMBADA.is_file()
    if with_lambada:
        args += ["--dataset", str(LAMBADA)]
    elif os.environ.get("CI") == "true":
        pytest.fail(f"{LAMBADA} is missing on CI")
    payload = script.main(args)

    names = [script.resolve_config(config).name for _, config in script.CONFIGS]
    assert names[0] == "fp32" and len(set(names)) == len(names)
    datasets = ["builtin"] + (["lambada_test"] if with_lambada else [])
    for name in ["results.md", "results.json", "trace-tiny-mamba-pydoc.png", "long-stream-tiny-mamba-pydoc.png",
                 *(f"pareto-tiny-mamba-pydoc-{script.slug(d)}.png" for d in datasets)]:
        assert (tmp_path / name).stat().st_size > 0, name

    markdown = (tmp_path / "results.md").read_text()
    assert "python scripts/results.py" in markdown and "torch" in markdown
    for dataset in datasets:
        rows = table_rows(markdown, f"tiny-mamba-pydoc — {dataset}")
        assert [row[0] for row in rows] == names  # one row per config, in grid order
        fp32 = rows[0]
        assert fp32[-3] == "+0.000%"  # Δ vs fp32 of fp32 itself
        for row in rows:
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
            assert record["delta_vs_fp32"] == 0.0
    check_long_streams(script, markdown, payload)
    if not with_lambada:
        pytest.skip(f"LAMBADA part skipped: {LAMBADA} is absent (the built-in part passed)")


def test_lambada_split_and_padding_rows_are_independent():
    """A row's LAMBADA score does not depend on the other rows of its batch (right padding, per-row policies)."""
    import torch

    from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR
    from gsq_hf.eval.data import load_model, load_tokenizer

    script = load_script()
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


def check_long_streams(script, markdown: str, payload: dict) -> None:
    """2 streams of 300 builtin tokens: buckets 1–255 and 256–299, Δ vs fp32 per bucket, the answer sentence."""
    names = [cfg.name for _, cfg in script.long_stream_configs()]
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


def test_long_stream_configs_are_the_uniform_formats_and_one_per_dynamic_family():
    script = load_script()
    chosen = script.long_stream_configs()
    uniform = [script.resolve_config(c).name for family, c in script.CONFIGS if family == script.UNIFORM]
    assert [cfg.name for _, cfg in chosen] == uniform + list(script.LONG_STREAM_DYNAMIC)
    dynamic = [family for family, _ in chosen if family != script.UNIFORM]
    assert len(set(dynamic)) == len(dynamic) == len({f for f, _ in script.CONFIGS} - {script.UNIFORM})
    assert script.long_stream_dataset(["x/lambada_test.jsonl", "wiki.test.raw"]) == "wiki.test.raw"


def test_growth_sentence_states_the_verdict_with_the_numbers():
    script = load_script()

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


def test_bucket_deltas_pool_the_streams_and_give_their_standard_error():
    script = load_script()
    fp32 = {"perplexity": [math.e, math.e], "tokens": [4, 8], "window_nll_sum": [[2.0, 4.0], [2.0, 4.0]]}
    mine = {"perplexity": [math.exp(1.25), math.e], "tokens": [4, 8], "window_nll_sum": [[2.0, 4.0], [3.0, 4.0]]}
    delta, stderr = script.bucket_deltas(mine, fp32)
    assert delta == pytest.approx([math.exp(0.25) - 1, 0.0])
    per_stream = [0.0, math.exp(0.5) - 1]  # stream 1: 1 nat more over its 2 tokens of the first bucket
    assert stderr == pytest.approx([abs(per_stream[1] - per_stream[0]) / 2, 0.0])  # std of two / √2
    one = {key: value[:1] if key == "window_nll_sum" else value for key, value in fp32.items()}
    assert all(math.isnan(e) for e in script.bucket_deltas(one, one)[1])

"""scripts/results.py, the report writer over `gsq_hf.eval.sweep`: end to end on the built-in model with a small
budget (the report's tables and sentences hold the payload's numbers), and its sentences from given records.
The numbers themselves are tested in tests/eval/test_sweep.py and test_verdict.py."""

import itertools
import json
import math
import os
import re
from pathlib import Path

import pytest
from script_loader import load_script

from gsq_hf.config import resolve_config
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR
from gsq_hf.eval.sweep import CONFIGS

ROOT = Path(__file__).resolve().parents[1]
LAMBADA = ROOT.parent / "shared" / "data" / "lambada" / "lambada_test.jsonl"
RECALL_MODEL = ROOT / "gsq_hf" / "assets" / "recall-mamba2"
# the CI run: the uniform curve, the composed front, one family from the seed grid and one low-bit dynamic family
FAMILIES = "uniform,composed,gate-open int8/fp16,gate-closed int3/int8"


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
    names = payload["configs"]
    assert names[:11] == ["fp32", "bf16", "fp16", "fp8", "int8", "int7", "int6", "int5", "int4", "int3", "int2"]
    datasets = ["builtin"] + (["lambada_test"] if with_lambada else [])
    for name in ["results.md", "results.json", "trace-tiny-mamba-pydoc.png", "long-stream-tiny-mamba-pydoc.png",
                 "long-stream-kl-tiny-mamba-pydoc.png", "recall-pareto-recall-mamba2.png",
                 *(f"pareto-tiny-mamba-pydoc-{script.slug(d)}.png" for d in datasets)]:
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "results.json").read_text())["configs"] == names

    markdown = (tmp_path / "results.md").read_text()
    assert "python scripts/results.py" in markdown and "torch" in markdown
    for dataset in datasets:
        rows = table_rows(markdown, f"tiny-mamba-pydoc — {dataset}")
        records = [r for r in payload["records"] if r["dataset"] == dataset]
        assert [row[0] for row in rows] == [r["config"] for r in records] == names  # grid order
        for row, record in zip(rows, records, strict=True):  # the table holds the payload's numbers
            assert float(row[2]) == pytest.approx(record["perplexity"], abs=1e-4)
            assert row[-2] == f"{record['avg_state_bits']:.2f}"
        assert rows[0][-5:-2] == ["+0.000 ± 0.000%", "-", "-"]  # Δ vs fp32 of fp32 itself; no KL or top-1 vs itself
        for row, record in zip(rows[1:], records[1:], strict=True):  # Δ ± its paired standard error
            assert row[-5] == f"{100 * record['delta_vs_fp32']:+.3f} ± {100 * record['delta_stderr']:.3f}%"
        for front in ("the round-to-nearest uniform front", "the composed-format front"):
            for metric in ("perplexity", "KL vs fp32"):
                assert re.search(rf"\*\*Beats {front} at equal bits — tiny-mamba-pydoc — {dataset} \({metric}\):"
                                 r"\*\* (none|\S+)", markdown)
    streams = table_rows(markdown, "tiny-mamba-pydoc — long streams of builtin")
    assert [row[0] for row in streams] == [r["config"] for r in payload["long_stream"]] == [
        "fp32", "bf16", "fp16", "int8", "int4", "int3", "gsq-4bit", "gsq-3bit", "gate-open@0.3"]
    assert streams[0][3:] == ["+0.000 ± 0.000%"] * 3  # fp32: all positions, 1–255, 256–299
    assert re.search(r"\*\*Does the error grow with sequence length\?\*\* (Yes for|No)", markdown)
    assert re.search(r"\*\*Does the divergence from fp32 grow with sequence length\?\*\* (It grows for|No config)",
                     markdown)
    recall = table_rows(markdown, "recall-mamba2 — recall")
    (entry,) = payload["recall"]
    assert [row[0] for row in recall] == names and recall[0][2:] == ["32.00", recall[0][3], recall[0][3],
                                                                    "+0.00 ± 0.00", "+0.00 ± 0.00"]
    assert [float(row[3]) for row in recall] == pytest.approx([100 * r["recall"] for r in entry["results"]], abs=0.01)
    assert re.search(r"\*\*recall-mamba2 recall:\*\* gap 32 \(training gap\): fp32 [\d.]+%, int8 [\d.]+%, "
                     r"int4 [\d.]+%, int3 [\d.]+%; .*; gap 128: not measured", markdown)
    answers = markdown.split("### tiny-mamba-pydoc — the questions, answered", 1)[1].split("###", 1)[0]
    assert re.search(r"\*\*Is int8 static state quantization lossless .*\*\* (Yes|No): builtin [-+]\d", answers)
    assert "**The GSQ seed: gate-closed states go to int8" in answers  # gate-open@0.3 is in FAMILIES
    assert "**The entropy seed" not in answers  # entropy@0.5 is not: no sentence without its numbers
    again = tmp_path / "again"
    script.main(["--from-json", str(tmp_path / "results.json"), "--out", str(again)])  # the report alone
    assert (again / "results.md").read_text() == markdown
    whole = json.loads((tmp_path / "results.json").read_text())  # the same run made in two processes, reported once
    model_part = {**whole, "recall": [], "verdicts": [v for v in whole["verdicts"] if v["metric"] != "recall"]}
    recall_part = {**whole, "options": {**whole["options"], "recall_only": True, "models": []}, "references": [],
                   "records": [], "long_stream": [], "traces": [],
                   "verdicts": [v for v in whole["verdicts"] if v["metric"] == "recall"]}
    for name, part in (("models.json", model_part), ("recall.json", recall_part)):
        (tmp_path / name).write_text(json.dumps(part))
    merged = tmp_path / "merged"
    script.main(["--from-json", str(tmp_path / "models.json"), "--from-json", str(tmp_path / "recall.json"),
                 "--out", str(merged)])
    command = whole["command"]
    report_command = "python scripts/results.py " + " ".join(["--from-json", str(tmp_path / "models.json"),
                                                              "--from-json", str(tmp_path / "recall.json"),
                                                              "--out", str(merged)])
    assert (merged / "results.md").read_text() == markdown.replace(command, f"{command}\n{command}\n{report_command}")
    assert json.loads((merged / "results.json").read_text())["records"] == whole["records"]
    if not with_lambada:
        pytest.skip(f"LAMBADA part skipped: {LAMBADA} is absent (the built-in part passed)")


def test_growth_sentence_states_the_verdict_with_the_numbers():
    script = load_script("results")

    def rec(config, delta, stderr=(0.0001, 0.0001, 0.0001)):
        return {"config": config, "streams": 8, "delta_vs_fp32": 0.0,
                "position_buckets": {"delta_vs_fp32": list(delta), "delta_stderr": list(stderr)}}

    labels = ["1–255", "256–999", "1000–4999"]
    group = [rec("fp32", (0.0, 0.0, 0.0)), rec("int8", (0.0002, 0.0005, 0.0009)), rec("int4", (0.01, 0.05, 0.06)),
             rec("fp8", (0.01, 0.05, 0.05)), rec("noisy", (0.01, 0.03, 0.03), (0.01, 0.01, 0.01)),
             rec("x", (-0.03, 0.0, 0.001))]
    sentence = script.growth_sentence(group, labels)
    assert sentence.startswith("**Does the error grow with sequence length?** Yes for int4, fp8; it shrinks for "
                               "x; still growing between the last two buckets: int4. Growth: |Δ| rises by more "
                               "than 0.1 percentage point and more than twice its standard error over the 8 streams.")
    assert ("positions 1–255 → 1000–4999: int8 +0.020 ± 0.010% → +0.090 ± 0.010%; int4 +1.000 ± 0.010% → "
            "+6.000 ± 0.010%; fp8 ") in sentence and sentence.endswith("x -3.000 ± 0.010% → +0.100 ± 0.010%.")
    assert "** No. Growth" in script.growth_sentence(group[:2], labels)
    assert "Not measured: fewer than two" in script.growth_sentence(group, ["1–255"])


def test_kl_growth_sentence():
    script = load_script("results")

    def rec(config, kl, stderr):
        return {"config": config, "streams": 2, "position_buckets": {"kl_divergence": list(kl),
                                                                    "kl_stderr": list(stderr)}}

    labels = ["1–255", "256–1023"]
    group = [{"config": "fp32"}, rec("int8", (1e-5, 4e-5), (1e-6, 1e-6)), rec("int4", (1e-2, 1.1e-2), (1e-3, 1e-3))]
    sentence = script.kl_growth_sentence(group, labels)
    assert sentence.startswith("**Does the divergence from fp32 grow with sequence length?** It grows for int8: ")
    assert "int8 1.00e-05 → 4.00e-05 (x4.00); int4 1.00e-02 → 1.10e-02 (x1.10)." in sentence
    assert "No config's KL grows" in script.kl_growth_sentence(group[::2], labels)
    assert "Not judged (one stream" in script.kl_growth_sentence(
        [group[0], rec("int8", (1e-5, 4e-5), (math.nan, math.nan))], labels)


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
    builtin = script.model_provenance(str(BUILTIN_MODEL_DIR))
    assert "held-out loss" in builtin and script.PUBLISHED_MAMBA_130M not in builtin  # not a WikiText model


def test_seed_configs_are_the_presets_and_questions_are_answered_from_the_records():
    script = load_script("results")
    grid = {resolve_config(c).name: resolve_config(c) for _, c in CONFIGS}
    for preset, config in script.SEED_CONFIGS.items():
        ours, theirs = grid[config].to_dict(), resolve_config(preset).to_dict()
        ours.pop("name"), theirs.pop("name")
        assert ours == theirs, preset

    def rec(config, delta, bits, acc=None):
        return {"config": config, "delta_vs_fp32": delta, "avg_state_bits": bits, "lambada_accuracy": acc}

    groups = {"wiki": [rec("fp32", 0.0, 32), rec("int8", 0.0004, 10), rec("gate-open@0.3", 0.0002, 11.6),
                       rec("entropy@0.5", 0.004, 12.0)],
              "lambada": [rec("fp32", 0.0, 32, 0.25), rec("int8", 0.002, 10, 0.24),
                          rec("gate-open@0.3", 0.0001, 11.6, 0.25), rec("entropy@0.5", 0.01, 12.0, 0.2)]}
    judged = {"wiki": [{"config": "x@1", "reference": 0.01, "beats": True, "gain": 0.003, "bits": 6.5},
                       {"config": "y@1", "reference": 0.01, "beats": False, "gain": 0.0, "bits": 7.0},
                       {"config": "z@1", "reference": None, "beats": None, "gain": None, "bits": 3.0}],
              "lambada": []}
    judged_kl = {"wiki": [{"config": "x@1", "reference": -9.0, "beats": False, "gain": -0.5, "bits": 6.5}],
                 "lambada": [{"config": "y@1", "reference": -9.0, "beats": True, "gain": math.log(2.0), "bits": 7.0}]}
    groups["wiki"][1]["kl_divergence"], groups["wiki"][1]["top1_agreement"] = 2.5e-6, 0.999
    text = "\n".join(script.questions_section("m", groups, judged, judged_kl))
    assert "No: wiki +0.040%, KL 2.50e-06 nats/token, top-1 agreement 99.90%; lambada +0.200%" in text
    assert ("more than 2 standard errors — wiki: 0 of 1; lambada: 1 of 1 (largest: y@1, a factor 2.00 at 7.00 "
            "bits)") in text
    text = "\n".join(script.questions_section("m", groups, judged))  # without KL: no KL sentence
    assert "(LAMBADA accuracy 24.0% vs 25.0%)." in text and "In KL vs fp32" not in text
    assert "wiki: 1 of 2 (largest: x@1, 0.30 pp at 6.50 bits); lambada: 0 of 0." in text
    assert "wiki: Δ +0.020% at 11.60 bits vs uniform int8 +0.040% at 10.00 bits" in text
    assert "The claim holds at the 0.1% bar" in text
    assert "wiki: 12.00 bits = 25% less state traffic than an fp16 state, Δ +0.400%; uniform int8 38% less" in text

"""scripts/improvements.py: its signal statistics, its comparisons need more than noise, and the whole report
runs end to end on a committed recall model with a small budget (the signals cover every state write)."""

import json
import math
from pathlib import Path

import pytest
import torch
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
RECALL_MODEL = ROOT / "gsq_hf" / "assets" / "recall-mamba"


@pytest.fixture(scope="module")
def script():
    return load_script("improvements")


def test_signal_observer_separates_rescales_from_the_dead_band(script):
    observer = script.SignalObserver()
    layer = object()
    first = torch.tensor([[[7.0, 3.0, 1.0, -2.0, 4.0, 5.0, 6.0, -1.0]]])  # one row; int4 (max code 7): steps of 1
    observer.observe(layer, first, torch.zeros(1, 1))  # a layer's first write only sets the baseline
    assert observer.elements == 0
    observer.observe(layer, 0.5 * first, torch.zeros(1, 1))  # a pure rescale (Mamba2's decay): codes unchanged
    moved = 0.5 * first + torch.tensor([[[0.0, 0.1, 0, 0, 0, 0, 0, 0]]])  # 0.2 of an int4 step: the dead band
    observer.observe(layer, moved, torch.ones(1, 1))
    stats = observer.summary()
    assert stats["unit_writes"] == 2
    assert stats["int4_still_fraction"] == stats["int3_still_fraction"] == pytest.approx(15 / 16)
    assert stats["int4_dead_band_fraction"] == stats["int3_dead_band_fraction"] == pytest.approx(1 / 16)
    assert stats["gate_open_fraction"][0.3] == 0.5


def record(line, config, bits, correct, queries=1000):
    p = (correct + 1) / (queries + 2)
    stderr = math.sqrt(p * (1 - p) / queries)
    by_gap = {"32": {"recall": correct / queries, "recall_stderr": stderr, "avg_state_bits": bits}}
    return {"family": line, "config": config, "avg_state_bits": bits, "recall": correct / queries,
            "recall_stderr": stderr, "by_gap": by_gap}


def test_compare_needs_more_than_noise_and_every_front(script):
    records = [record(script.NEAREST, "int8", 9.0, 990), record(script.NEAREST, "int4", 5.0, 900),
               record(script.SR, "int8-sr", 9.0, 990), record(script.SR, "int4-sr", 5.0, 980),
               record("x", "beats-both", 7.0, 999), record("x", "beats-nearest-only", 7.0, 980),
               record("x", "noise", 7.0, 950), record("x", "outside", 3.0, 999)]
    found = {c["config"]: c for c in script.compare(records, None)}
    assert set(found) == {"int8-sr", "int4-sr", "beats-both", "beats-nearest-only", "noise", "outside"}
    assert set(found["int4-sr"]["versus"]) == {script.NEAREST} and found["int4-sr"]["front"]  # 980 vs 900
    assert found["int8-sr"]["front"] is False  # equal: not better
    assert found["beats-both"]["front"]
    assert found["beats-both"]["versus"][script.SR]["reference"] == pytest.approx(0.985)
    nearest_only = found["beats-nearest-only"]
    assert nearest_only["versus"][script.NEAREST]["better"] and not nearest_only["versus"][script.SR]["better"]
    assert nearest_only["front"] is False
    assert found["noise"]["versus"][script.NEAREST]["better"] is False  # 95.0 vs 94.5: within noise
    assert found["outside"]["versus"] == {} and found["outside"]["front"] is None
    text = script.verdict("m", list(found.values()))
    assert "- x: **moves the front** beyond uniform and uniform-sr: beats-both at 7.00 bits" in text
    assert "- uniform-sr: **moves the front** beyond uniform: int4-sr" in text
    headline = script.summary([{"model": "m", "comparisons": list(found.values())},
                               {"model": "n", "comparisons": [found["noise"], found["outside"]]}])
    assert "- m: **moves the front**: uniform-sr (up to +8.00 points at equal bits: int4-sr" in headline
    assert "; x (up to +1.40 points at equal bits: beats-both, 99.90% at 7.00 bits, beyond uniform and uniform-sr)" \
        in headline
    assert "- n: nothing moves the front" in headline


def test_bad_input_is_a_clear_error(script, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--model .*: .*recall_model.json not found"):
        script.main(["--model", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        script.main(["--gaps", "32,x"])
    assert "--gaps: '32,x': expected positive integers" in capsys.readouterr().err


def test_lines_are_checked(script):
    assert script.select_lines(None) == script.LINES
    assert script.select_lines("finer groups") == [script.NEAREST, "finer groups"]
    with pytest.raises(SystemExit, match="--lines: unknown 'nope'; known: uniform, uniform-sr"):
        script.select_lines("nope")


@pytest.mark.slow
def test_improvements_report_end_to_end(script, tmp_path):
    lines = "finer groups,gate-closed int3/int8 sr,uniform-sr"
    payload = script.main(["--model", str(RECALL_MODEL), "--num", "4", "--gaps", "32", "--signal-num", "2",
                           "--lines", lines, "--threads", "1", "--out", str(tmp_path)])
    markdown = (tmp_path / "improvements.md").read_text()
    assert (tmp_path / "improvements-recall-mamba.png").stat().st_size > 0
    saved = json.loads((tmp_path / "improvements.json").read_text())
    assert saved["command"].startswith("python scripts/improvements.py --model") and saved["num"] == 4
    (model,) = payload["models"]
    records = model["records"]
    assert records[0]["config"] == "fp32" and records[0]["delta_vs_fp32"] == 0.0
    assert {r["family"] for r in records} == {script.NEAREST, *lines.split(",")}
    config = json.loads((RECALL_MODEL / "config.json").read_text())
    spec = json.loads((RECALL_MODEL / "recall_model.json").read_text())["spec"]
    steps = 2 * spec["pairs"] + 32 + 2 * spec["queries"] - 1  # one-token forwards over a sequence at gap 32
    expected = 2 * config["num_hidden_layers"] * config["intermediate_size"] * (steps - 1)  # after each first write
    assert model["signals"]["unit_writes"] == expected
    assert 0.0 <= model["signals"]["int4_dead_band_fraction"] <= 1.0
    groups = {r["config"]: r["avg_state_bits"] for r in records if r["family"] == "finer groups"}
    assert groups == {"int3-g16": 5.0, "int3-g8": 7.0, "int2-g8": 6.0}  # one fp32 scale per 16 / 8 values
    for r in records:
        assert 0.0 <= r["recall"] <= 1.0 and math.isfinite(r["avg_state_bits"])
    assert "## What moves the front (all gaps pooled)" in markdown and "## The signals" in markdown
    assert "| signal | recall-mamba |" in markdown
    assert "**recall-mamba, all gaps pooled:**" in markdown and "- finer groups:" in markdown
    assert "Not built:" in markdown

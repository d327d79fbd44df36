"""scripts/improvements.py: its script-local variants do what they say, its comparisons need more than noise,
and the whole report runs end to end on a committed recall model with a small budget."""

import json
import math
from pathlib import Path

import pytest
import torch
from models import tiny_mamba
from script_loader import load_script

from gsq_hf import GSQCache, GSQConfig
from gsq_hf.formats import StateFormat, get_format

ROOT = Path(__file__).resolve().parents[1]
RECALL_MODEL = ROOT / "gsq_hf" / "assets" / "recall-mamba"


@pytest.fixture(scope="module")
def script():
    return load_script("improvements")


def test_per_state_dim_scales_quantize_over_the_rows_and_are_undone(script):
    x = torch.randn(2, 16, 8) * torch.logspace(-2, 1, 16)[:, None]  # rows of very different magnitude
    int4 = get_format("int4")
    per_row = int4.roundtrip(x, 8)
    quantize = StateFormat.quantize
    with script.per_state_dim_scales() as seen:
        inside = int4.roundtrip(x, 8)
        assert torch.equal(get_format("fp32").roundtrip(x, 8), x)  # unscaled formats are untouched
    assert seen["rows"] == 16 and StateFormat.quantize is quantize
    assert torch.equal(inside, int4.roundtrip(x.transpose(-1, -2), 16).transpose(-1, -2))
    assert not torch.equal(inside, per_row)
    assert torch.equal(int4.roundtrip(x, 8), per_row)  # restored


def test_error_budget_keeps_the_units_with_the_largest_round_trip_error(script):
    config = GSQConfig(policy="budget", low_format="int3", high_format="int8", budget_fraction=0.25)
    cache = GSQCache(tiny_mamba(), config)
    layer = cache.gsq_layer(0)
    state = torch.randn(3, 16, 8)
    state[:, 5] *= 50.0  # one unit far from the others: the largest absolute error in every row
    gate = torch.rand(3, 16)
    error = script.unit_error(state, get_format("int3"), 8)
    with script.budget_signal("error"):
        layer.write_ssm(state, gate, read_back=False)
    chosen = layer.storage.slot_units.sort(dim=1).values
    assert torch.equal(chosen, error.topk(4, dim=1).indices.sort(dim=1).values)
    assert (chosen == 5).any(dim=1).all()
    layer.write_ssm(state, gate, read_back=False)  # outside the context the gate ranks again
    assert torch.equal(layer.storage.slot_units.sort(dim=1).values, gate.topk(4, dim=1).indices.sort(dim=1).values)


def test_crest_factor_finds_the_outlier_row(script):
    state = torch.ones(1, 3, 4, 8)  # Mamba2 layout: (batch, heads, rows, d_state)
    state[0, 1, 2, 0] = 10.0  # one outlier in one row of head 1
    crest = script.crest_factor(state)
    assert crest.shape == (1, 3) and crest[0, 1] > 2.0 and torch.allclose(crest[0, [0, 2]], torch.ones(2))


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
    lines = "per-state-dim scales,error-budget int3/int8,gate-closed int3/int8 sr,uniform-sr"
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
    rows = model["signals"]["unit_writes"]
    assert rows > 0 and 0.0 <= model["signals"]["int4_dead_band_fraction"] <= 1.0
    dims = {r["config"]: r["avg_state_bits"] for r in records if r["family"] == "per-state-dim scales"}
    assert dims == {"int8-dim": 8.25, "int4-dim": 4.25, "int3-dim": 3.25}  # one fp32 scale per 128 channels
    for r in records:
        assert 0.0 <= r["recall"] <= 1.0 and math.isfinite(r["avg_state_bits"])
    assert "## What moves the front (all gaps pooled)" in markdown and "## The signals" in markdown
    assert "| signal | recall-mamba |" in markdown
    assert "**recall-mamba, all gaps pooled:**" in markdown and "- per-state-dim scales:" in markdown
    assert "Not built:" in markdown

"""Tables and the JSON writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tables import parse_table

from gsq_hf.eval.report import (
    add_deltas,
    eval_table,
    failed_record,
    memory_table,
    peak_resolution,
    versions,
    write_json,
)


def _record(config, ppl, **extra):
    return {"config": config, "perplexity": ppl, "word_perplexity": ppl * 2, "byte_perplexity": 1.5,
            "bits_per_byte": 0.58, "tokens": 100, "avg_state_bits": 8.0, "state_bytes": 512.0,
            "full_precision_state_bytes": 2048.0, "tokens_per_second": 1234.5, **extra}


def test_deltas_are_relative_to_the_first_config():
    records = add_deltas([_record("fp32", 10.0), _record("int4", 11.0), failed_record("bad", 100, "NaN")])
    assert records[0]["delta_vs_reference"] == 0.0
    assert math.isclose(records[1]["delta_vs_reference"], 0.1)
    assert records[2]["delta_vs_reference"] is None


def test_deltas_carry_their_paired_standard_error_into_the_table():
    """Two windows of 50 tokens: int4 adds 5 and 15 nats, 0.1 and 0.3 nat per token: Δ NLL 0.2 ± 0.1."""
    fp32 = _record("fp32", math.exp(2.0), window_nll_sum=[100.0, 100.0])
    int4 = _record("int4", math.exp(2.2), window_nll_sum=[105.0, 115.0])
    records = add_deltas([fp32, int4, failed_record("bad", 100, "NaN")])
    assert records[1]["delta_nll"] == pytest.approx(0.2) and records[1]["delta_nll_stderr"] == pytest.approx(0.1)
    assert records[1]["delta_stderr"] == pytest.approx(math.exp(0.2) * 0.1)
    assert records[0]["delta_stderr"] == 0.0 and records[2]["delta_stderr"] is None
    rows = {row["config"]: row for row in parse_table(eval_table(records))}
    assert rows["int4"]["Δ ppl vs first"] == f"{math.expm1(0.2):+.3%} ± {100 * math.exp(0.2) * 0.1:.3f}"
    assert rows["fp32"]["Δ ppl vs first"] == "+0.000% ± 0.000"
    without = add_deltas([_record("fp32", 10.0), _record("int4", 11.0)])  # records without per-window sums
    assert parse_table(eval_table(without))[1]["Δ ppl vs first"] == "+10.000%"


def test_eval_table_has_one_row_per_config_and_notes_failures():
    table = eval_table(add_deltas([_record("fp32", 10.0),
                                   _record("int4", 11.0, kl_divergence=0.00123, top1_agreement=0.975),
                                   failed_record("bad", 100, "bad: NaN/Inf logits")]))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["config", "ppl", "word"]
    assert lines[2].split()[:8] == ["fp32", "10.0000", "20.0000", "1.5000", "0.5800", "+0.000%", "-", "-"]
    assert lines[3].split()[5:8] == ["+10.000%", "1.23e-03", "97.50%"]  # Δ, KL and top-1 vs the first config
    assert "0.250" in lines[3]  # state vs full precision
    assert lines[4].split()[:2] == ["bad", "FAILED"]
    assert lines[5] == "bad: NaN/Inf logits"  # the error names its config already: not twice


def test_eval_table_separates_bits_moved_from_bytes_allocated_and_has_a_legend():
    gate = _record("gsq-gate", 10.5, avg_state_bits=11.63, state_bytes=70656, full_precision_state_bytes=81920,
                   ssm_state_bytes=54272, full_precision_ssm_state_bytes=65536, kl_divergence=2.5e-4,
                   top1_agreement=0.99)
    int8 = _record("int8", 10.0, avg_state_bits=10.0, state_bytes=36864, full_precision_state_bytes=81920,
                   ssm_state_bytes=20480, full_precision_ssm_state_bytes=65536)
    table = eval_table(add_deltas([int8, gate]), kl_top_k=64)
    rows = {row["config"]: row for row in parse_table(table)}
    assert set(rows) == {"int8", "gsq-gate *"}  # the mark: allocates more than its bits moved suggest
    assert (rows["gsq-gate *"]["bits moved/elem"], rows["gsq-gate *"]["alloc bits/elem"]) == ("11.63", "26.50")
    assert (rows["int8"]["bits moved/elem"], rows["int8"]["alloc bits/elem"]) == ("10.00", "10.00")
    assert (rows["gsq-gate *"]["alloc B/seq"], rows["gsq-gate *"]["alloc vs full"]) == ("70,656", "0.863")
    assert (rows["gsq-gate *"]["Δ ppl vs first"], rows["gsq-gate *"]["KL vs first"]) == ("+5.000%", "2.50e-04")
    assert rows["gsq-gate *"]["top-1"] == "99.00%" and rows["int8"]["KL vs first"] == "-"
    assert "tok/s" not in table  # one untimed pass measures machine load, not the config
    legend = table.split("\n", len(rows) + 2)[-1]
    assert legend.startswith("columns (Δ, KL and top-1 compare each row with the first, int8)")
    for column in ("Δ ppl vs first", "KL vs first", "top-1", "bits moved/elem", "alloc bits/elem", "alloc B/seq",
                   "*"):
        assert f"\n  {column} " in legend, column
    assert "KL(int8 ‖ config)" in legend and "top-64 logits" in legend and "bandwidth" in legend
    assert "* " not in eval_table([int8])  # no row marked: no footnote


@pytest.mark.parametrize("repeat_rss, resolution", [(2**30 + 3 * 2**20, 3 * 2**20), (2**30, 4096)])
def test_memory_table_says_whether_the_peak_resolves_the_state(repeat_rss, resolution):
    """The two unpatched runs' difference is the resolution (at least a 4 KiB page): 8 sequences x 1 MiB less
    state resolve against 4 KiB or 3 MiB of noise, 8 x 256 B never does."""
    base = {"config": "unpatched", "weight_bytes": 2**20, "peak_rss_bytes": 2**30, "generate_rss_delta_bytes": 0,
            "peak_cuda_bytes": None, "generate_cuda_delta_bytes": None, "state_bytes": 2 * 2**20}
    small = {**base, "config": "int8", "peak_rss_bytes": 2**30 + 2**20, "state_bytes": 2 * 2**20 - 256}
    big = {**base, "config": "int4", "peak_rss_bytes": 2**30 - 2**20, "state_bytes": 2**20}
    records = [base, small, big, {**base, "peak_rss_bytes": repeat_rss, "repeat": True}]
    assert peak_resolution(records, "peak_rss_bytes") == resolution
    table = memory_table(records, batch_size=8)
    rows = {row["config"]: row for row in parse_table(table)}
    assert list(rows) == ["unpatched", "int8", "int4", "unpatched (again)"]
    assert [rows["int8"][k] for k in ("peak RSS MiB", "Δ peak RSS KiB", "state B/seq", "Δ state x8 KiB")] == [
        "1,025.00", "+1,024.0", "2,096,896", "-2.0"]
    assert (rows["int4"]["Δ state x8 KiB"], rows["int4"]["resolved"]) == ("-8,192.0", "yes")
    assert rows["int8"]["resolved"] == "no" and rows["unpatched"]["resolved"] == "-"
    footer = " ".join(table.splitlines()[2 + len(rows):])  # wrapped lines under the table
    assert footer.startswith(f"resolution: {resolution / 1024:,.1f} KiB of peak RSS") and "no (int8)" in footer
    assert "CUDA" not in table and "tok/s" not in table
    # a config storing the unpatched state bytes (fp32) whose peak moved by 9 MiB: that much is not state either
    fp32 = {**base, "config": "fp32", "peak_rss_bytes": 2**30 - 9 * 2**20}
    assert peak_resolution([*records[:3], fp32, records[3]], "peak_rss_bytes") == 9 * 2**20
    rows = {row["config"]: row for row in parse_table(memory_table([*records[:3], fp32, records[3]], batch_size=8))}
    assert rows["int4"]["resolved"] == "no" and rows["fp32"]["resolved"] == "no"


def test_memory_table_judges_cuda_peaks_on_a_gpu():
    base = {"config": "unpatched", "peak_rss_bytes": 2**30, "peak_cuda_bytes": 2**21, "state_bytes": 4096.0}
    records = [base, {**base, "config": "int8", "peak_cuda_bytes": 2**21 + 512, "state_bytes": 1024.0},
               {**base, "repeat": True}]
    table = memory_table(records, batch_size=1)
    rows = parse_table(table)
    assert rows[1]["peak CUDA MiB"] == "2.00" and rows[1]["resolved"] == "yes"  # 3 KiB of state vs 512 B
    assert "of peak CUDA" in table
    assert "resolution unknown" in memory_table(records[:2])  # no repeat: no resolution


def test_json_is_strict_and_written_atomically(tmp_path, monkeypatch):
    path = write_json(tmp_path / "sub" / "out.json", {"results": [{"perplexity": float("nan"), "x": [float("inf")]}],
                                                      "versions": versions()})
    data = json.loads(path.read_text())
    assert data["results"] == [{"perplexity": None, "x": [None]}]
    assert set(data["versions"]) == {"python", "torch", "transformers", "gsq_hf"}
    write_text = Path.write_text

    def interrupted(self, text):  # Ctrl-C half-way through writing
        write_text(self, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"results": [1, 2, 3]})
    assert json.loads(path.read_text()) == data  # the previous file, whole
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temporary file left


def test_table_without_rows():
    assert memory_table([]).splitlines()[0].startswith("config")

"""Tables and the JSON writer."""

from __future__ import annotations

import json
import math

from gsq_hf.eval.report import add_deltas, eval_table, failed_record, memory_table, versions, write_json


def _record(config, ppl, **extra):
    return {"config": config, "perplexity": ppl, "word_perplexity": ppl * 2, "byte_perplexity": 1.5,
            "bits_per_byte": 0.58, "tokens": 100, "avg_state_bits": 8.0, "state_bytes": 512.0,
            "full_precision_state_bytes": 2048.0, "tokens_per_second": 1234.5, **extra}


def test_deltas_are_relative_to_the_first_config():
    records = add_deltas([_record("fp32", 10.0), _record("int4", 11.0), failed_record("bad", 100, "NaN")])
    assert records[0]["delta_vs_reference"] == 0.0
    assert math.isclose(records[1]["delta_vs_reference"], 0.1)
    assert records[2]["delta_vs_reference"] is None


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
    assert lines[5] == "bad: bad: NaN/Inf logits"


def test_memory_table_shows_cuda_columns_only_on_a_gpu():
    cpu = {"config": "unpatched", "peak_rss_bytes": 2**30, "generate_rss_delta_bytes": 2**20,
           "peak_cuda_bytes": None, "generate_cuda_delta_bytes": None, "state_bytes": 4096.0,
           "tokens_per_second": 10.0}
    int8 = {**cpu, "config": "int8", "state_bytes": 1024.0}
    table = memory_table([cpu, int8])
    assert "CUDA" not in table and "1,024.00" in table and "0.250" in table
    gpu = memory_table([{**cpu, "peak_cuda_bytes": 2**21, "generate_cuda_delta_bytes": 2**20}])
    assert "peak CUDA MiB" in gpu and "2.00" in gpu


def test_json_is_strict(tmp_path):
    path = write_json(tmp_path / "sub" / "out.json", {"results": [{"perplexity": float("nan"), "x": [float("inf")]}],
                                                      "versions": versions()})
    data = json.loads(path.read_text())
    assert data["results"] == [{"perplexity": None, "x": [None]}]
    assert set(data["versions"]) == {"python", "torch", "transformers", "gsq_hf"}


def test_table_without_rows():
    assert memory_table([]).splitlines()[0].startswith("config")

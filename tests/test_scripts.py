"""The benchmark scripts run end to end on the built-in model with a small budget (their numbers are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args, "--json", str(out)], check=True,
                   capture_output=True, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_speculative_runs_and_is_exact(tmp_path):
    result = run_script("bench_speculative", "--drafts", "int4", "--lookaheads", "3", "--prompts", "1",
                        "--prompt-tokens", "8", "--new-tokens", "8", tmp_path=tmp_path)
    rows = result["rows"]
    assert rows[0]["mode"] == "plain greedy" and len(rows) == 1 + 6  # fixed/entropy x checkpoints/recompute/replay
    assert all(row["exact"] for row in rows)
    for row in rows[1:]:
        kinds = ("draft_state_bytes", "target_state_bytes", "checkpoint_bytes", "replay_write_bytes",
                 "replay_read_bytes")
        assert sum(row[k] for k in kinds) == pytest.approx(row["state_bytes_per_token"])
        assert row["state_bytes_vs_plain"] > 0
        assert (row["checkpoint_bytes"] > 0) == (row["rollback"] == "checkpoints")
        assert (row["replay_write_bytes"] > 0) == (row["rollback"] == "replay")


@pytest.mark.slow
def test_bench_decode_overhead_runs(tmp_path):
    result = run_script("bench_decode_overhead", "--shapes", "mamba-tiny", "mamba2-tiny", "--batch-sizes", "2",
                        "--configs", "int8", "--steps", "2", "--rounds", "1", tmp_path=tmp_path)
    assert {row["shape"] for row in result["rows"]} == {"mamba-tiny", "mamba2-tiny"}
    assert all(row["ratio"] > 0 for row in result["rows"])


def test_kl_bound_measures_the_top_k_share_of_the_exact_kl(tmp_path):
    """On the built-in model (vocabulary 2048): the bound never exceeds the exact KL and grows with k."""
    from script_loader import load_script

    payload = load_script("kl_bound").main(["--dataset", "builtin", "--context", "32", "--max-tokens", "128",
                                            "--top-k", "4", "--top-k", "64", "--top-k", "5000", "--config", "int4",
                                            "--out", str(tmp_path)])
    (record,) = payload["records"]
    shares = [record["bound"][k]["ratio"] for k in ("4", "64", "5000")]
    assert record["kl_exact"] > 0 and 0 < shares[0] <= shares[1] <= 1 + 1e-9
    assert shares[2] == 1.0  # k beyond the vocabulary: the exact KL
    assert "| tiny-mamba-pydoc | int4 |" in (tmp_path / "kl-bound.md").read_text()


def test_format_front_scores_formats_against_fp32(tmp_path):
    """Language and recall models through the front script: bits counted as stored, KL against fp32 on the
    same windows (int8's far below a 3-bit format's), recall per gap."""
    from script_loader import load_script

    from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR

    front = load_script("format_front")
    recall_model = ROOT / "gsq_hf" / "assets" / "recall-mamba2"
    front.main(["--model", str(BUILTIN_MODEL_DIR), "--dataset", "builtin", "--context", "32", "--max-tokens", "256",
                "--recall", str(recall_model), "--recall-num", "8",
                "--only", "int8", "midrise3-e4m3-hadamard", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "front.json").read_text())["records"]
    lm = {r["config"]: r for r in records if r["dataset"] == "builtin"}
    assert lm["int8"]["bits"] == 10.0 and 3.5 < lm["midrise3-e4m3-hadamard"]["bits"] < 3.6  # + a row scale
    assert 0 < lm["int8"]["kl"] < lm["midrise3-e4m3-hadamard"]["kl"]
    recall = [r for r in records if r["dataset"] == "recall"]
    assert [r["config"] for r in recall] == ["int8", "midrise3-e4m3-hadamard"] and set(recall[0]["recall_by_gap"])
    for r in lm.values():  # Δ perplexity vs fp32 on the same windows, ± its paired standard error over them
        assert r["delta_ppl"] == pytest.approx(r["perplexity"] / r["fp32_perplexity"] - 1, abs=1e-12)
        assert r["windows"] == 8 and 0 < r["delta_ppl_stderr"] < 1
    assert all(set(r["delta_stderr_by_gap"]) == set(r["recall_by_gap"]) for r in recall)
    assert "Δ ppl ± SE" in (tmp_path / "front.md").read_text()
    assert (tmp_path / "front.md").read_text().count("```") == 4 and list(tmp_path.glob("front-*.png"))

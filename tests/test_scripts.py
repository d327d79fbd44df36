"""The benchmark scripts run end to end on the built-in model with a small budget (their numbers are not asserted)."""

import json
import os
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
                "--only", "int8", "midrise3-e4m3-hadamard", "--format", "levels5-e4m3-hadamard+sr",
                "--out", str(tmp_path)])
    records = json.loads((tmp_path / "front.json").read_text())["records"]
    lm = {r["config"]: r for r in records if r["dataset"] == "builtin"}
    assert lm["int8"]["bits"] == 10.0 and 3.5 < lm["midrise3-e4m3-hadamard"]["bits"] < 3.6  # + a row scale
    assert 3.0 < lm["levels5-e4m3-hadamard+sr"]["bits"] < 3.1
    assert 0 < lm["int8"]["kl"] < lm["midrise3-e4m3-hadamard"]["kl"]
    recall = [r for r in records if r["dataset"] == "recall"]
    assert [r["config"] for r in recall] == ["int8", "midrise3-e4m3-hadamard", "levels5-e4m3-hadamard+sr"]
    assert set(recall[0]["recall_by_gap"]) == {"32", "128"}  # recall-mamba2's training gap and 4x it
    for r in lm.values():  # Δ perplexity vs fp32 on the same windows, ± its paired standard error over them
        assert r["delta_ppl"] == pytest.approx(r["perplexity"] / r["fp32_perplexity"] - 1, abs=1e-12)
        assert r["windows"] == 8 and 0 < r["delta_ppl_stderr"] < 1
    assert all(set(r["delta_stderr_by_gap"]) == set(r["recall_by_gap"]) for r in recall)
    assert "Δ ppl ± SE" in (tmp_path / "front.md").read_text()
    assert (tmp_path / "front.md").read_text().count("```") == 4 and list(tmp_path.glob("front-*.png"))
    front.main(["--recall", str(recall_model), "--recall-num", "4", "--recall-gaps", "5", "--recall-pairs", "3",
                "--only", "int8", "--out", str(tmp_path / "gaps")])
    gaps = json.loads((tmp_path / "gaps" / "front.json").read_text())["records"]
    assert [set(r["recall_by_gap"]) for r in gaps] == [{"5"}]
    assert gaps[0]["queries"] == 4 * 3  # 3 pairs: at most 3 queries a sequence
    with pytest.raises(SystemExit, match="pairs"):  # more pairs than the task's 64 keys
        front.main(["--recall", str(recall_model), "--recall-pairs", "65", "--out", str(tmp_path / "gaps")])
    with pytest.raises(SystemExit, match="levels7"):
        front.main(["--format", "levels7", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"'\+sr', '\+qr', '\+holdH'"):
        front.main(["--format", "int4+hold1.5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"'\+gN'"):
        front.main(["--format", "int4+g0", "--out", str(tmp_path)])


def test_format_front_per_layer_and_allocation(tmp_path):
    """--per-layer scores a format on one state layer at a time; --allocate picks one format per layer within a
    budget from those records, scores it, and writes it as a config that loads."""
    from script_loader import load_script

    from gsq_hf import GSQConfig
    from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR

    front = load_script("format_front")
    front.main(["--model", str(BUILTIN_MODEL_DIR), "--dataset", "builtin", "--context", "32", "--max-tokens", "128",
                "--per-layer", "int8", "midrise2-e4m3-hadamard", "--allocate", "6", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "front.json").read_text())["records"]
    per_layer = [r for r in records if "layer" in r]
    layers = sorted({r["layer"] for r in per_layer})
    assert len(per_layer) == 2 * len(layers) >= 4
    assert all(r["kl"] < s["kl"] for r in per_layer if r["layer_format"] == "int8"
               for s in per_layer if s["layer"] == r["layer"] and s["layer_format"] != "int8")
    [alloc] = [r for r in records if r["config"] == "alloc6"]
    assert set(alloc["allocation"].values()) == {"int8", "midrise2-e4m3-hadamard"} and alloc["bits"] <= 6.01
    config = GSQConfig.from_file(tmp_path / alloc["allocation_file"])
    assert {int(i): f for i, f in alloc["allocation"].items()} == {i: config.for_layer(i).policy.format for i in layers}
    assert "one state layer in the format" in (tmp_path / "front.md").read_text()
    with pytest.raises(SystemExit, match="give --per-layer too"):
        front.main(["--allocate", "4", "--out", str(tmp_path)])


def test_allocation_minimizes_summed_kl_within_the_budget():
    """Layers weighted by their state elements: the big insensitive layer takes the fewest bits."""
    from script_loader import load_script

    front = load_script("format_front")
    kl = {0: {"midrise2-e4m3-hadamard": 1.0, "midrise3-e4m3-hadamard": 0.5, "midrise4-e4m3-hadamard": 0.2},
          1: {"midrise2-e4m3-hadamard": 0.1, "midrise3-e4m3-hadamard": 0.05, "midrise4-e4m3-hadamard": 0.02}}
    records = [{"layer": i, "layer_format": f, "kl": v} for i, by in kl.items() for f, v in by.items()]
    layers = {0: 16, 1: 16}  # bits per element at d_state 16: 2.5, 3.5, 4.5
    assert front.allocate(records, layers, {0: 1, 1: 1}, 3.0) == {0: "midrise3-e4m3-hadamard",
                                                                  1: "midrise2-e4m3-hadamard"}
    assert front.allocate(records, layers, {0: 1, 1: 3}, 3.0) == {0: "midrise4-e4m3-hadamard",
                                                                  1: "midrise2-e4m3-hadamard"}
    assert front.allocate(records, layers, {0: 1, 1: 1}, 9.0) == {0: "midrise4-e4m3-hadamard",
                                                                  1: "midrise4-e4m3-hadamard"}
    with pytest.raises(SystemExit, match="no allocation"):
        front.allocate(records, layers, {0: 1, 1: 1}, 2.0)
    # 3^11 combinations: the Lagrangian search; within the budget, and the sensitive layer keeps the most bits
    many = [{"layer": i, "layer_format": r["layer_format"], "kl": r["kl"] * (10 if i == 0 else 1)}
            for i in range(11) for r in records if r["layer"] == 1]
    chosen = front.allocate(many, dict.fromkeys(range(11), 16), dict.fromkeys(range(11), 1), 3.0)
    bits = {"midrise2-e4m3-hadamard": 2.5, "midrise3-e4m3-hadamard": 3.5, "midrise4-e4m3-hadamard": 4.5}
    assert sum(bits[f] for f in chosen.values()) / 11 <= 3.0 and chosen[0] == "midrise4-e4m3-hadamard"


def test_format_front_suffixes_make_the_config():
    """'+sr', '+holdH' and '+gN' in any order on a format or a preset name."""
    from script_loader import load_script

    from gsq_hf import GSQConfig

    front = load_script("format_front")
    assert front.CANDIDATES[front._add_format("int4-e4m3+hold0.7+sr")] == {
        "policy": "static", "format": "int4-e4m3", "name": "int4-e4m3_hold0.7_sr", "rounding": "stochastic",
        "scale_hold": 0.7}
    preset = front.CANDIDATES[front._add_format("gsq-4bit+hold.5")]
    assert preset["scale_hold"] == 0.5 and preset["family_overrides"]["mamba"]["rounding"] == "quasirandom"
    assert GSQConfig.from_dict(preset).for_model_type("mamba").scale_hold == 0.5  # over the preset's 0.85
    grouped = GSQConfig.from_dict(front.CANDIDATES[front._add_format("gsq-3bit+g8+sr")])
    assert grouped.group_size == 8 and grouped.for_model_type("mamba2").group_size == 8
    assert grouped.for_model_type("mamba2").rounding == "stochastic"
    quasi = GSQConfig.from_dict(front.CANDIDATES[front._add_format("gsq-4bit+qr")])
    assert {quasi.for_model_type(family).rounding for family in ("mamba", "mamba2")} == {"quasirandom"}


def test_format_front_config_files_are_candidates(tmp_path):
    """--config: any GSQConfig file (a policy over composed formats) is scored under its file name; a bad one
    stops with the file named."""
    from script_loader import load_script

    from gsq_hf import GSQConfig

    front = load_script("format_front")
    path = tmp_path / "slow-heads.yaml"
    path.write_text("policy: {kind: budget, fraction: 0.25, high_when: closed, low: midrise2-e4m3-hadamard, "
                    "high: midrise4-e4m3-hadamard}\n")
    config = GSQConfig.from_dict(front.CANDIDATES[front._add_config(str(path))])
    assert config.name == "slow-heads" and config.policy.kind == "budget" and config.policy.fraction == 0.25
    path.write_text("policy: {kind: budget, fraction: 2}\n")
    with pytest.raises(SystemExit, match="slow-heads.yaml.*fraction"):
        front._add_config(str(path))
    with pytest.raises(SystemExit, match="missing.yaml"):
        front._add_config(str(tmp_path / "missing.yaml"))


@pytest.mark.slow
def test_device_perf_script_dry_runs_every_step_into_out(tmp_path):
    """scripts/device_perf.sh with DRY_RUN=1: each benchmark step on tiny shapes, JSON and tables into $OUT."""
    run = subprocess.run(["bash", str(ROOT / "scripts" / "device_perf.sh")], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env=os.environ | {"OUT": str(tmp_path), "DRY_RUN": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    graph = json.loads((tmp_path / "bench_generate_graph.json").read_text())
    assert graph["graph"] and graph["dry_run"]
    configs = {row["config"] for row in graph["rows"] if "tokens_per_s" in row}
    assert configs == {"unpatched", "fp32", "bf16", "int8", "int4", "gsq-gate", "gsq-4bit", "gsq-3bit"}
    assert not [row for row in graph["rows"] if "error" in row]
    state_log = (tmp_path / "state_update.log").read_text()
    assert "kernel-gsq-3bit" in state_log
    for method in ("conv-kernel+kernel-gsq-4bit", "conv-fused-int8"):  # the conv with the update (Mamba2: fused)
        assert method in state_log
    assert "generate_graph" in (tmp_path / "tables.md").read_text()


@pytest.mark.slow
def test_device_perf_speculative_mode_dry_runs_into_out(tmp_path):
    """``device_perf.sh speculative`` with DRY_RUN=1: bench_speculative's random-weight mode at two batch sizes,
    plain greedy (fp32, int8) and both drafts in every file, no error rows, every speculative row identical to
    plain fp32 greedy decoding, and the random-weights caveat carried into the JSON and the tables."""
    run = subprocess.run(["bash", str(ROOT / "scripts" / "device_perf.sh"), "speculative"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, env=os.environ | {"OUT": str(tmp_path),
                                                                                         "DRY_RUN": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    for name, batch in (("speculative_b64", 4), ("speculative_b1", 1)):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["dry_run"] and result["batch_size"] == batch and "random weights" in result["note"]
        rows = result["rows"]
        assert not [row for row in rows if "error" in row]
        assert [(row["mode"], row["target"], row["draft"]) for row in rows] == [
            ("plain greedy", "fp32", "-"), ("plain greedy", "int8", "-"),
            ("speculative", "fp32", "gsq-4bit+conv-int4-e8m0"), ("speculative", "fp32", "int4")]
        for row in rows[2:]:
            assert row["rows_identical_to_plain"] == row["rows"] == batch and row["exact"]
            assert (row["lookahead"], row["rollback"]) == (8, "replay") and row["tokens_per_second"] > 0
            assert 0 < row["state_bytes_vs_plain"] and 0 <= row["acceptance_rate"] <= 1
    tables = (tmp_path / "tables.md").read_text()
    assert tables.count("| gsq-4bit+conv-int4-e8m0 | 8 | fixed | replay | once |") == 2 and "random weights" in tables


@pytest.mark.parametrize("args, message", [
    (["perf_report.py", "/no/such/bench.json"], "perf_report.py: error: [Errno 2] No such file or directory"),
    (["format_front.py", "--out", "{tmp}"], "nothing to score: give a language model (--model)"),
    (["train_default_model.py", "--steps", "-1", "--output-dir", "{tmp}"], "--steps: must be a positive integer"),
    (["results.py", "--from-json", "/no/such.json", "--out", "{tmp}"], "results.py: error: [Errno 2]"),
])
def test_scripts_answer_bad_input_in_one_line(tmp_path, args, message):
    """A script's bad input is one stderr line and exit 2 (gsq_hf.cli.common.run_script, argparse), no traceback."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / args[0]), *(a.format(tmp=tmp_path) for a in args[1:])],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith("[transformers]")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert message in lines[-1], lines

"""``gsq-hf recall``: the JSON contract on a tiny random model, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from models import tiny_mamba
from transformers import GPT2Config, GPT2LMHeadModel

from gsq_hf.cli import main
from gsq_hf.eval.recall import MQARSpec

SPEC = MQARSpec(pairs=3, gap=4, queries=2, keys=16, values=16, filler=8)  # 42 ids: fits the tiny model's 64
RECORD_KEYS = {"config", "policy", "recall", "recall_by_gap", "delta_vs_first", "delta_by_gap", "correct", "queries",
               "avg_state_bits", "state_bytes", "full_precision_state_bytes", "tokens_per_second", "by_gap"}
STATE_BYTES = 2 * (64 * 8 * 4 + 64 * 4 * 4)  # per sequence, fp32: 2 layers x (SSM 64x8 + conv 64x4)


def _recall_dir(model, directory, spec: MQARSpec = SPEC) -> str:
    model.save_pretrained(directory)
    (directory / "recall_model.json").write_text(json.dumps({"spec": asdict(spec), "recall_fp32": 0.0}))
    return str(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _recall_dir(tiny_mamba(), tmp_path_factory.mktemp("tiny-recall"))


def test_recall_json_contract(model_dir, tmp_path, capsys):
    out = tmp_path / "recall.json"
    code = main(["recall", "--model", model_dir, "--config", "fp32", "int8", "--config", "gsq-gate", "--gap", "2,6",
                 "--num", "3", "--json", str(out), "--quiet"])
    assert code == 0
    data = json.loads(out.read_text())
    assert {"model", "task", "gaps", "num", "seed", "device", "dtype", "batch_size", "versions", "scoring",
            "results", "trained"} <= set(data)
    assert data["trained"] == {"family": None, "parameters": None, "recall_fp32": 0.0, "command": None}
    assert (data["model"], data["task"], data["gaps"], data["num"], data["seed"]) == (model_dir, asdict(SPEC),
                                                                                     [2, 6], 3, 0)
    assert set(data["versions"]) == {"python", "torch", "transformers", "gsq_hf"}
    results = data["results"]
    assert [r["config"] for r in results] == ["fp32", "int8", "gsq-gate"]
    for record in results:
        assert RECORD_KEYS <= set(record)
        assert record["queries"] == 2 * 3 * SPEC.queries and set(record["recall_by_gap"]) == {"2", "6"}
        assert record["full_precision_state_bytes"] == STATE_BYTES  # per sequence, not per batch
        assert 0.0 <= record["recall"] <= 1.0
    assert results[0]["delta_vs_first"] == 0.0 and results[0]["avg_state_bits"] == 32.0
    assert results[1]["avg_state_bits"] == 12.0 and results[1]["state_bytes"] < STATE_BYTES
    table = capsys.readouterr().out.splitlines()
    assert "gap 2 %" in table[0] and "gap 6 %" in table[0]
    assert [line.split()[0] for line in table[2:]] == ["fp32", "int8", "gsq-gate"]


def test_default_gaps_are_the_training_gap_and_4x(model_dir, tmp_path):
    out = tmp_path / "recall.json"
    assert main(["recall", "--model", model_dir, "--config", "fp32", "--num", "2", "--pairs", "2", "--json",
                 str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["gaps"] == [4, 16] and data["task"]["pairs"] == data["task"]["queries"] == 2


def test_shipped_recall_models_by_name(tmp_path, monkeypatch):
    """``--model recall-mamba`` (no such directory here) is the model that ships; default: recall-mamba2."""
    monkeypatch.chdir(tmp_path)
    for args, shipped in ((["--model", "recall-mamba"], "recall-mamba"), ([], "recall-mamba2")):
        out = tmp_path / f"{shipped}.json"
        assert main(["recall", *args, "--config", "fp32", "--num", "2", "--gap", "8", "--json", str(out),
                     "--quiet"]) == 0
        model = json.loads(out.read_text())["model"]
        assert model.endswith(f"gsq_hf/assets/{shipped}") and (Path(model) / "recall_model.json").is_file()


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory):
    """A model whose vocabulary cannot hold its task, a non-Mamba model, a directory without recall_model.json."""
    root = tmp_path_factory.mktemp("bad")
    small = _recall_dir(tiny_mamba(), root / "small-vocab", MQARSpec(keys=64, values=64))
    gpt2 = _recall_dir(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=1, n_head=2)),
                       root / "gpt2")
    bare = root / "bare"
    tiny_mamba().save_pretrained(bare)
    return {"small": small, "gpt2": gpt2, "bare": str(bare), "missing": str(root / "missing")}


@pytest.mark.parametrize("args, message", [
    (["--gap", "0"], "gap 0 is not accepted: gaps are positive integers"),
    (["--gap=-3"], "gap -3 is not accepted"),
    (["--gap", "4,0,8"], "gap 0 is not accepted"),
    (["--gap", "4,x"], "argument --gap: expected comma-separated integers"),
    (["--pairs", "17"], "pairs=17 needs as many distinct keys; keys=16"),
    (["--pairs", "2", "--queries", "3"], "queries=3 asks more distinct keys than pairs=2"),
    (["--num", "0"], "argument --num: must be a positive integer"),
    (["--config", "nope"], "unknown preset 'nope'"),
    (["--model", "small"], "the MQAR task needs 146 token ids; the model has 64"),
    (["--model", "gpt2"], "has no Mamba-family mixer gsq_hf can patch"),
    (["--model", "bare"], "recall_model.json not found"),
    (["--model", "missing"], "does not exist; pass a directory written by scripts/train_recall.py"),
    (["--device", "banana"], "device 'banana' is not a torch device"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, model_dir, bad_dirs, capsys):
    args = [bad_dirs.get(a, a) for a in args]
    model = [] if "--model" in args else ["--model", model_dir]
    code = main(["recall", *model, *args, "--num", "2", "--quiet"] if "--num" not in args
                else ["recall", *model, *args, "--quiet"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gsq-hf"), captured.err
    assert message in lines[0] and captured.out == ""

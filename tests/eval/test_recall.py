"""MQAR generator, decode-faithful recall scoring, the recall sweep, and the committed recall models."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from models import tiny_mamba, tiny_mamba2

import gsq_hf
from gsq_hf.eval.recall import (
    MQARSpec,
    RecallInputError,
    generate_mqar,
    load_recall_spec,
    recall_accuracy,
    recall_sweep,
    recall_table,
)

ASSETS = Path(gsq_hf.__file__).parent / "assets"
RECALL_FLOOR = 0.95  # the target for the committed models at fp32 and the training gap

SPEC = MQARSpec(pairs=3, gap=4, queries=2, keys=16, values=16, filler=8)  # vocab 2 + 16 + 16 + 8 = 42 <= 64


def test_generator_is_seeded_and_well_formed():
    a, b, c = generate_mqar(SPEC, 5, seed=1), generate_mqar(SPEC, 5, seed=1), generate_mqar(SPEC, 5, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.input_ids.shape == a.query_mask.shape == (5, SPEC.length) == (5, 2 * 3 + 4 + 2 * 2)
    ids = a.input_ids
    keys, values = ids[:, 0:6:2], ids[:, 1:6:2]
    assert ((keys >= 2) & (keys < 18)).all() and ((values >= 18) & (values < 34)).all()
    assert all(len(set(row.tolist())) == 3 for row in keys)  # distinct keys per sequence
    assert ((ids[:, 6:10] >= 34) & (ids[:, 6:10] < 42)).all()  # filler
    for row in range(5):  # every query key is followed by the value it was paired with
        pairs = dict(zip(keys[row].tolist(), values[row].tolist(), strict=True))
        for pos in a.query_mask[row].nonzero().flatten().tolist():
            assert pairs[ids[row, pos].item()] == ids[row, pos + 1].item()
    assert a.query_mask.sum(1).tolist() == [2] * 5


@pytest.mark.parametrize("field, value, message", [
    ("gap", 0, "gap must be a positive integer"),
    ("gap", -3, "gap must be a positive integer"),
    ("pairs", 20, "pairs=20 needs as many distinct keys; keys=16 \\(each pair has its own key"),
    ("queries", 4, "queries=4 asks more distinct keys than pairs=3"),
])
def test_bad_specs(field, value, message):
    kwargs = dict(pairs=3, gap=4, queries=2, keys=16, values=16, filler=8) | {field: value}
    with pytest.raises(RecallInputError, match=message):
        MQARSpec(**kwargs)


@pytest.mark.parametrize("build", [tiny_mamba, tiny_mamba2])
def test_fp32_recall_equals_the_full_forward_argmax(build):
    model = build()
    batch = generate_mqar(SPEC, 6, seed=0)
    logits = model(batch.input_ids, use_cache=False).logits[:, :-1]
    hits = (logits.argmax(-1) == batch.input_ids[:, 1:]) & batch.query_mask[:, :-1]
    result = recall_accuracy(model, batch, "fp32", batch_size=4)
    assert result["queries"] == 12 and result["correct"] == int(hits.sum())
    assert not gsq_hf.is_patched(model)
    quantized = recall_accuracy(model, batch, "int4", batch_size=4)
    assert 0.0 <= quantized["accuracy"] <= 1.0 and quantized["avg_state_bits"] == pytest.approx(4 + 32 / 8)


def test_vocabulary_too_small_is_refused():
    with pytest.raises(ValueError, match="needs 146 token ids; the model has 64"):
        recall_accuracy(tiny_mamba(), generate_mqar(MQARSpec(), 2))


def test_sweep_records_share_sequences_across_configs_and_gaps(family):
    """Deltas compare like with like: every config sees the same sequences, and every gap the same pairs."""
    model = tiny_mamba() if family == "mamba" else tiny_mamba2()
    result = recall_sweep(model, SPEC, ["fp32", "int8", "gsq-gate"], gaps=[2, 8], num=4, batch_size=4)
    assert (result["task"], result["gaps"], result["num"], result["seed"]) == (asdict(SPEC), [2, 8], 4, 0)
    fp32, int8, gate = result["results"]
    assert [r["config"] for r in result["results"]] == ["fp32", "int8", "gsq-gate"]
    assert fp32["queries"] == 2 * 4 * SPEC.queries and set(fp32["recall_by_gap"]) == set(fp32["by_gap"]) == {"2", "8"}
    assert fp32["delta_vs_first"] == 0.0 and fp32["delta_by_gap"] == {"2": 0.0, "8": 0.0}
    assert int8["delta_vs_first"] == pytest.approx(int8["recall"] - fp32["recall"])
    assert fp32["avg_state_bits"] == 32.0 and int8["avg_state_bits"] == pytest.approx(8 + 32 / 8)
    assert int8["state_bytes"] < fp32["state_bytes"] == fp32["full_precision_state_bytes"]
    assert 12.0 <= gate["avg_state_bits"] <= 16 + 32 / 8 and gate["policy"] == "gate"
    assert fp32["recall"] == pytest.approx(sum(fp32["recall_by_gap"].values()) / 2)  # equal queries per gap
    short, long = (generate_mqar(MQARSpec(**{**asdict(SPEC), "gap": g}), 4).input_ids for g in (2, 8))
    assert torch.equal(short[:, :6], long[:, :6]) and torch.equal(short[:, -4:], long[:, -4:])
    table = recall_table(result["results"]).splitlines()
    assert table[0].split()[:4] == ["config", "recall", "%", "Δ"] and "gap 8 %" in table[0]
    assert [line.split()[0] for line in table[2:]] == ["fp32", "int8", "gsq-gate"]
    one = recall_sweep(model, SPEC, "int8", gaps=[2, 8], num=4, batch_size=4)  # one config: not its letters
    assert [r["config"] for r in one["results"]] == ["int8"] and one["results"][0]["recall"] == int8["recall"]


@pytest.mark.parametrize("gaps, message", [([0], "gap 0 is not accepted"), ([4, -2], "gap -2 is not accepted"),
                                           ([], "an empty gap list")])
def test_sweep_refuses_bad_gaps_before_running(gaps, message):
    with pytest.raises(RecallInputError, match=message):
        recall_sweep(tiny_mamba(), SPEC, ["fp32"], gaps=gaps, num=2)


def test_sweep_refuses_a_vocabulary_too_small_for_the_task():
    with pytest.raises(RecallInputError, match=r"needs 146 token ids; the model has 64 \(2 reserved \+ 64 keys"):
        recall_sweep(tiny_mamba(), MQARSpec(), ["fp32"], num=2)


def test_spec_is_read_from_the_model_directory(tmp_path):
    (tmp_path / "recall_model.json").write_text(json.dumps({"spec": asdict(SPEC), "recall_fp32": 0.5}))
    assert load_recall_spec(tmp_path) == SPEC
    assert load_recall_spec(tmp_path, pairs=2) == MQARSpec(**{**asdict(SPEC), "pairs": 2, "queries": 2})
    assert load_recall_spec(tmp_path, pairs=5, queries=1).queries == 1
    with pytest.raises(RecallInputError, match="pairs=17 needs as many distinct keys; keys=16"):
        load_recall_spec(tmp_path, pairs=17)
    with pytest.raises(RecallInputError, match="queries=3 asks more distinct keys than pairs=2"):
        load_recall_spec(tmp_path, pairs=2, queries=3)


def test_missing_model_directory_or_task_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecallInputError, match="model directory .*nowhere' does not exist"):
        load_recall_spec(tmp_path / "nowhere")
    with pytest.raises(RecallInputError, match="recall_model.json not found: gsq-hf recall reads the task"):
        load_recall_spec(tmp_path)
    (tmp_path / "recall_model.json").write_text("{}")
    with pytest.raises(RecallInputError, match="has no readable 'spec' object"):
        load_recall_spec(tmp_path)


# -- the committed recall models (gsq_hf/assets/recall-*, trained by scripts/train_recall.py) ------------------
COMMITTED = ["mamba", "mamba2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMITTED)
def test_committed_recall_model_recalls_at_fp32_and_int8(name):
    """The stated figure holds decode-faithfully, and int8 states cost at most one point of recall."""
    from transformers import AutoModelForCausalLM

    directory = ASSETS / f"recall-{name}"
    stated = json.loads((directory / "recall_model.json").read_text())["recall_fp32"]
    spec = load_recall_spec(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    batch = generate_mqar(spec, 256, seed=0)  # the first 256 sequences of the set the training run reported
    fp32 = recall_accuracy(model, batch, "fp32", batch_size=256)["accuracy"]
    int8 = recall_accuracy(model, batch, "int8", batch_size=256)["accuracy"]
    assert stated >= RECALL_FLOOR
    assert fp32 >= min(stated, RECALL_FLOOR) - 0.01
    assert int8 >= fp32 - 0.01

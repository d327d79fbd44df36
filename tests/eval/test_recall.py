"""MQAR generator and decode-faithful recall scoring (the recall models themselves are not trained yet)."""

import pytest
import torch
from models import tiny_mamba, tiny_mamba2

import gsq_hf
from gsq_hf.eval.recall import MQARSpec, generate_mqar, recall_accuracy

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
    ("pairs", 20, "pairs=20 needs as many distinct keys"),
    ("queries", 4, "queries=4 asks more distinct keys than pairs=3"),
])
def test_bad_specs(field, value, message):
    kwargs = dict(pairs=3, gap=4, queries=2, keys=16, values=16, filler=8) | {field: value}
    with pytest.raises(ValueError, match=message):
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

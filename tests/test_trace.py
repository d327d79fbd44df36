"""The opt-in precision trace of `GSQCache`: which fraction of each row's units every state write stores high."""

import math

import pytest
import torch
from models import tiny_mamba, tiny_mamba2

import gsq_hf
from gsq_hf import GSQCache
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR, builtin_text
from gsq_hf.eval.data import load_model, load_tokenizer, make_windows
from gsq_hf.eval.perplexity import decode_faithful_perplexity

GATE = {"policy": "gate", "low_format": "int8", "high_format": "fp16", "threshold": 0.5}


def layer0(cache: GSQCache):
    return cache.gsq_layer(0)


def state(batch=2, units=8, inner=(4,)):
    return torch.randn(batch, units, *inner, generator=torch.Generator().manual_seed(0))


def test_hand_made_gate_signals_give_known_fractions():
    cache = GSQCache(tiny_mamba().config, GATE, trace="units")
    gates = [
        torch.tensor([[0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [1.0] * 8]),  # 2/8 and 8/8 open
        torch.tensor([[0.0] * 8, [0.5, 0.49, 0.5, 0.49, 0.5, 0.49, 0.5, 0.49]]),  # 0/8 and 4/8 (>= threshold)
        torch.tensor([[0.6] * 6 + [0.2] * 2, [0.2] * 8]),  # 6/8 and 0/8
    ]
    for gate in gates:
        layer0(cache).write_ssm(state(), gate, read_back=False)
    trace = cache.precision_trace()
    high = trace["high_fraction"]
    assert high.shape == (2, 3, 2) and high.dtype == torch.float32 and high.device.type == "cpu"
    assert high[0].tolist() == [[0.25, 1.0], [0.0, 0.5], [0.75, 0.0]]
    assert torch.isnan(high[1]).all()  # layer 1 was never written: padded
    units = trace["unit_formats"]
    assert units.shape == (2, 3, 2, 8) and units.dtype == torch.int8
    assert torch.equal(units[0].bool(), torch.stack([g >= 0.5 for g in gates]))
    assert (units[1] == -1).all()
    assert trace["format_ids"] == {0: "int8", 1: "fp16", 2: "fp32_fallback"}
    assert trace["layers"] == [0, 1] and trace["policy"] == "gate"
    assert (trace["low_format"], trace["high_format"]) == ("int8", "fp16")


def test_closed_gate_budget_entropy_and_static():
    config = tiny_mamba().config
    gate = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.3, 0.7, 0.2, 0.6]] * 2)

    closed = GSQCache(config, {**GATE, "high_when": "closed"}, trace=True)
    layer0(closed).write_ssm(state(), gate, read_back=False)
    assert closed.precision_trace()["high_fraction"][0, 0].tolist() == [0.5, 0.5]
    assert closed.precision_trace()["unit_formats"] is None  # trace=True: fractions only

    budget = GSQCache(config, {"policy": "budget", "low_format": "int4", "high_format": "fp16",
                               "budget_fraction": 0.25}, trace="units")
    layer0(budget).write_ssm(state(), gate, read_back=False)  # K = 2 slots per row: the two most open units
    trace = budget.precision_trace()
    assert trace["high_fraction"][0, 0].tolist() == [0.25, 0.25]
    assert trace["unit_formats"][0, 0, 0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]

    entropy = GSQCache(config, {"policy": "entropy", "low_format": "int4", "high_format": "fp16",
                                "threshold": 0.5}, trace=True)
    layer0(entropy).write_ssm(state(), None, read_back=False)  # no logits yet: every row high
    entropy.row_signal = torch.tensor([0.7, 0.2])
    layer0(entropy).write_ssm(state(), None, read_back=False)
    assert entropy.precision_trace()["high_fraction"][0].tolist() == [[1.0, 1.0], [1.0, 0.0]]

    static = GSQCache(config, "int4", trace=True)
    layer0(static).write_ssm(state(), None, read_back=False)
    trace = static.precision_trace()
    assert trace["high_fraction"][0, 0].tolist() == [0.0, 0.0] and trace["high_format"] is None


def test_nonfinite_unit_is_traced_as_fallback_not_high():
    cache = GSQCache(tiny_mamba().config, GATE, trace="units")
    values = state()
    values[0, 3, 1] = math.nan
    with pytest.warns(RuntimeWarning, match="non-finite"):
        layer0(cache).write_ssm(values, torch.ones(2, 8), read_back=False)  # every unit open
    trace = cache.precision_trace()
    assert trace["unit_formats"][0, 0, 0].tolist() == [1, 1, 1, 2, 1, 1, 1, 1]
    assert trace["high_fraction"][0, 0].tolist() == [7 / 8, 1.0]


def test_off_by_default_start_stop_reset():
    cache = GSQCache(tiny_mamba().config, GATE)
    layer0(cache).write_ssm(state(), torch.ones(2, 8), read_back=False)
    assert not cache.tracing and layer0(cache).trace_high == []
    with pytest.raises(RuntimeError, match="start_trace"):
        cache.precision_trace()
    cache.start_trace()
    assert cache.tracing
    layer0(cache).write_ssm(state(), torch.ones(2, 8), read_back=False)
    cache.stop_trace()
    layer0(cache).write_ssm(state(), torch.ones(2, 8), read_back=False)  # not logged
    assert not cache.tracing and cache.precision_trace()["high_fraction"].shape == (2, 1, 2)
    cache.start_trace()  # a new log
    assert cache.precision_trace()["high_fraction"].shape == (2, 0, 0)
    layer0(cache).write_ssm(state(), torch.ones(2, 8), read_back=False)
    cache.reset()  # a reset cache starts a new sequence: its log starts again, still tracing
    assert cache.tracing and cache.precision_trace()["high_fraction"].shape == (2, 0, 0)


def test_batch_change_is_padded():
    cache = GSQCache(tiny_mamba().config, GATE, trace=True)
    layer0(cache).write_ssm(state(batch=3), torch.ones(3, 8), read_back=False)
    cache.batch_select_indices(torch.tensor([0]))
    layer0(cache).write_ssm(state(batch=1), torch.zeros(1, 8), read_back=False)
    high = cache.precision_trace()["high_fraction"][0]
    assert high[0].tolist() == [1.0, 1.0, 1.0]
    assert high[1, 0] == 0.0 and torch.isnan(high[1, 1:]).all()


@pytest.mark.parametrize("build", [tiny_mamba, tiny_mamba2], ids=["mamba", "mamba2"])
def test_generate_logs_one_write_per_token(build):
    model = gsq_hf.patch(build(), "gsq-gate")
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    cache = GSQCache(model.config, "gsq-gate", trace=True)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache, pad_token_id=0)
    assert out.shape[1] == 9
    high = cache.precision_trace()["high_fraction"]
    assert high.shape == (2, 5 + 4 - 1, 2)  # every prompt token and every new token but the last is absorbed
    assert ((high >= 0) & (high <= 1)).all()
    # the log matches the statistics memory_report() keeps
    fraction = cache.memory_report()["format_fractions"]["fp16"]
    assert high.mean().item() == pytest.approx(fraction, abs=1e-6)


@pytest.fixture(scope="module")
def builtin():
    return load_model(BUILTIN_MODEL_DIR), load_tokenizer(BUILTIN_MODEL_DIR)


def test_entropy_policy_on_a_decoded_sequence(builtin):
    """Each write's fraction is 1 where the entropy of the logits that predicted the token was >= threshold."""
    model, tokenizer = builtin
    config = {"policy": "entropy", "low_format": "int4", "high_format": "fp16", "threshold": 0.5}
    ids = tokenizer(builtin_text("test")[:400], return_tensors="pt").input_ids[:, :48]
    gsq_hf.patch(model, config)
    try:
        cache = GSQCache(model.config, config, trace=True)
        expected = [1.0]  # the first token has no logits to judge by: high
        for t in range(ids.shape[1]):
            logits = model(ids[:, t : t + 1], cache=cache).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, -1)
            entropy = float(-(logprobs.exp() * logprobs).sum() / math.log(logits.shape[-1]))
            expected.append(1.0 if entropy >= 0.5 else 0.0)
    finally:
        gsq_hf.unpatch(model)
    high = cache.precision_trace()["high_fraction"]
    assert high.shape == (model.config.num_hidden_layers, ids.shape[1], 1)
    assert (high == high[:1]).all()  # one decision per row, the same in every layer
    assert high[0, :, 0].tolist() == expected[: ids.shape[1]]
    assert 0 < sum(expected) < len(expected)  # the text has both confident and uncertain tokens


def test_decode_faithful_perplexity_keeps_first_batch_trace(builtin):
    model, tokenizer = builtin
    windows = make_windows(tokenizer, builtin_text("test"), 24, 24 * 3)
    plain = decode_faithful_perplexity(model, windows, "gsq-entropy", batch_size=2, progress=False)
    traced = decode_faithful_perplexity(model, windows, "gsq-entropy", batch_size=2, progress=False, trace=True)
    assert plain.trace is None and traced.perplexity == plain.perplexity
    assert traced.trace["high_fraction"].shape == (4, 23, 2)  # layers, context - 1 writes, first batch's rows
    assert traced.trace["config"] == "gsq-entropy" and "trace" not in traced.to_dict()
    assert traced.to_dict()["policy"] == "entropy"

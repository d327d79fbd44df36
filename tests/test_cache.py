import pytest
import torch

import gsq_hf
from gsq_hf import GSQCache


def decode(model, ids, cache=None):
    out = None
    for t in range(ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache)
        cache = out.cache
    return out


def test_memory_report_static_int8_counts_real_bytes(family, model):
    gsq_hf.patch(model, "int8")
    out = model(torch.randint(0, 64, (3, 6)))
    report = out.cache.memory_report()
    for key in ("state_bytes", "full_precision_state_bytes", "ssm_state_bytes", "full_precision_ssm_state_bytes",
                "avg_state_bits", "format_fractions", "state_bytes_per_step"):
        assert key in report
    layers = model.config.num_hidden_layers
    if family == "mamba":
        d, n = 64, 8
        ssm_elems = 3 * d * n
        assert report["ssm_state_bytes"] == layers * (ssm_elems + 3 * d * 4)  # int8 + one fp32 scale per channel
    else:
        h, p, n = 8, 8, 8
        ssm_elems = 3 * h * p * n
        assert report["ssm_state_bytes"] == layers * (ssm_elems + 3 * h * p * 4)
    assert report["full_precision_ssm_state_bytes"] == layers * ssm_elems * 4
    assert report["avg_state_bits"] == pytest.approx(8 + 32 / 8)
    assert report["format_fractions"]["int8"] == 1.0
    import json

    json.dumps(report)


def test_default_config_is_the_patch_s_else_fp32(model):
    """``GSQCache(model)``: the config the model is patched with (or saved with), else lossless fp32."""
    assert GSQCache(model).config.name == "fp32"
    gsq_hf.patch(model, "int4")
    try:
        assert GSQCache(model).config == gsq_hf.resolve_config("int4") == GSQCache(model.config).config
        assert GSQCache(model, "int8").config.name == "int8"
    finally:
        gsq_hf.unpatch(model)


def test_cache_saved_with_torch_save_continues_the_same(model):
    """``torch.save(out.cache)`` works (the model's weak reference is dropped) and the loaded cache decodes on as
    the original does."""
    import io

    gsq_hf.patch(model, "gsq-4bit")
    try:
        ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(1))
        cache = model(ids).cache
        buffer = io.BytesIO()
        torch.save(cache, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        token = ids[:, -1:]
        assert torch.equal(model(token, cache=loaded).logits, model(token, cache=cache).logits)
        assert "weight_bytes" in loaded.memory_report(model=model)
    finally:
        gsq_hf.unpatch(model)


def test_a_cache_for_a_model_without_mamba_layers_or_a_bad_trace_is_refused(model):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(gsq_hf.UnsupportedModelError, match="GSQCache: a gpt2 config has no Mamba state layer"):
        GSQCache(gpt2, "int8")
    with pytest.raises(ValueError, match="trace must be False, True or 'units'"):
        GSQCache(model, "int8", trace="yes")


def test_int4_and_budget_bound_memory(model):
    sizes = {}
    for preset in ("int4", "gsq-gate", "gsq-budget", "fp32"):
        with gsq_hf.patched(model, preset):
            report = model(torch.randint(0, 64, (2, 5))).cache.memory_report()
            sizes[preset] = report["ssm_state_bytes"]
            if preset == "gsq-budget":
                assert report["format_fractions"]["fp16"] == pytest.approx(0.25, abs=0.01)
    assert sizes["int4"] < sizes["gsq-budget"] < sizes["gsq-gate"] < sizes["fp32"]


def test_entropy_policy_follows_logits(model):
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    for threshold, expected_low in ((0.0, 0.0), (1.0, 5 / 6)):  # first token: no logits yet -> high
        gsq_hf.patch(model, {"policy": "entropy", "low_format": "int4", "high_format": "fp16", "threshold": threshold})
        out = decode(model, ids)
        assert out.cache.row_signal is not None and out.cache.row_signal.shape == (2,)
        assert out.cache.memory_report()["format_fractions"]["int4"] == pytest.approx(expected_low)
        gsq_hf.unpatch(model)
    gsq_hf.patch(model, {"policy": "entropy", "entropy_signal": "surprisal", "threshold": 0.5})
    out = decode(model, ids)
    assert ((out.cache.row_signal >= 0) & (out.cache.row_signal <= 1)).all()


def test_stochastic_rounding_reproducible_by_seed(model):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    logits = []
    for seed in (0, 0, 1):
        with gsq_hf.patched(model, {"policy": "static", "format": "int4", "rounding": "stochastic", "seed": seed}):
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])
    assert not torch.equal(logits[0], logits[2])


def test_quasirandom_rounding_is_deterministic_and_steps_with_the_writes(model):
    """Quasi-random rounding needs no generator: the same logits on every run (and per seed), other than
    stochastic rounding's; its thresholds step with the layer's write count (`GSQStateLayer.generator`)."""
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    logits = {}
    for rounding, seed in (("quasirandom", 0), ("quasirandom", 0), ("quasirandom", 1), ("stochastic", 0)):
        with gsq_hf.patched(model, {"policy": "static", "format": "int4", "rounding": rounding, "seed": seed}):
            logits.setdefault((rounding, seed), []).append(model(ids).logits)
    assert torch.equal(*logits[("quasirandom", 0)])
    assert not torch.equal(logits[("quasirandom", 0)][0], logits[("quasirandom", 1)][0])
    assert not torch.equal(logits[("quasirandom", 0)][0], logits[("stochastic", 0)][0])
    layer = GSQCache(model.config, {"policy": "static", "format": "int4", "rounding": "quasirandom"}).gsq_layers[0]
    first = layer.generator(torch.device("cpu"))
    units, inner = (64, (8,)) if hasattr(model.config, "intermediate_size") else (8, (8, 8))
    layer.write_ssm(torch.randn(2, units, *inner), None)
    second = layer.generator(torch.device("cpu"))
    assert (first.step, second.step) == (0, 1)


@pytest.mark.parametrize(("fmt", "bad"), [("int8", "nan"), ("int8", "inf"), ("bf16", "nan"), ("int4-fp16", "inf"),
                                          ("int4-e8m0", "nan"), ("int4-e4m3", "inf"), ("int4-e4m3", "nan")])
def test_nonfinite_state_kept_in_fp32_and_counted(model, fmt, bad):
    """Whatever the format stores its scales in (an fp16 scale saturates, an e8m0 one is an exponent)."""
    gsq_hf.patch(model, fmt)
    layer = GSQCache(model.config, fmt).gsq_layers[0]
    units = 64 if hasattr(model.config, "intermediate_size") else 8
    inner = (8,) if units == 64 else (8, 8)
    state = torch.randn(2, units, *inner)
    state[1, 3] = float(bad)
    with pytest.warns(RuntimeWarning, match="non-finite SSM state"):
        read = layer.write_ssm(state, torch.zeros(2, units))
    assert (~torch.isfinite(read[1, 3])).all() and torch.isfinite(read[0]).all() and torch.isfinite(read[1, 4:]).all()
    report = layer.cache.memory_report()
    assert report["nonfinite_unit_writes"] == 1
    assert report["format_fractions"]["fp32_fallback"] == pytest.approx(1 / (2 * units))


def test_snapshot_restore_and_rollback(model):
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    gsq_hf.patch(model, "int8")
    cache = model(ids[:, :2]).cache
    snap = cache.snapshot()
    cache.record_positions()
    model(ids[:, 2:6], cache=cache)  # 4 tokens, each checkpointed
    cache.rollback(2)  # keep ids[:, 2:4]
    cache.record_positions(False)
    rolled = model(ids[:, 4:5], cache=cache).logits
    straight = model(ids[:, 4:5], cache=model(ids[:, 2:4], cache=model(ids[:, :2]).cache).cache).logits
    assert torch.equal(rolled, straight)
    cache.restore(snap)
    assert torch.equal(model(ids[:, 2:3], cache=cache).logits, model(ids[:, 2:3], cache=model(ids[:, :2]).cache).logits)
    with pytest.raises(ValueError, match="roll back"):
        cache.rollback(1)  # nothing recorded any more
    with pytest.raises(RuntimeError, match="cannot be cropped"):
        cache.crop(-1)


def test_reorder_select_repeat_reset(model):
    gsq_hf.patch(model, "gsq-entropy")
    cache = decode(model, torch.randint(0, 64, (3, 3))).cache
    before = cache.gsq_layers[0].read_ssm()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.gsq_layers[0].read_ssm(), before[[2, 0, 1]])
    cache.batch_repeat_interleave(2)
    assert cache.gsq_layers[0].read_ssm().shape[0] == 6 and cache.row_signal.shape == (6,)
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(cache.gsq_layers[0].read_ssm(), before[[2, 1]])
    cache.reset()
    assert cache.gsq_layers[0].read_ssm() is None and not cache.has_previous_state()
    assert cache.memory_report()["state_bytes"] == 0


@pytest.mark.parametrize("write_mode", ["every_step", "end_of_forward"])
def test_lossy_conv_state_is_stored_in_its_format(model, write_mode):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    reference = model(ids, use_cache=False).logits
    gsq_hf.patch(model, {"policy": "static", "format": "fp32", "conv_format": "int8", "write_mode": write_mode})
    out = model(ids[:, :5])
    layer = out.cache.gsq_layers[0]
    assert layer.storage.conv.data.dtype == torch.int8
    rest = model(ids[:, 5:], cache=out.cache).logits
    logits = torch.cat([out.logits, rest], dim=1)
    err = (logits - reference).abs().max().item() / reference.abs().max().item()
    assert 0 < err < 0.05  # the int8 conv window changes the result, a little
    if write_mode == "end_of_forward":  # inside one forward nothing is rounded: the prefill is exact
        assert torch.allclose(out.logits, reference[:, :5], rtol=0, atol=1e-5 * reference.abs().max().item())
    report = out.cache.memory_report()
    assert report["conv_state_bytes"] < report["full_precision_conv_state_bytes"]

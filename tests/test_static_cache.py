"""A static GSQCache (``static=True``): buffers written in place, the same stored bytes and logits as the default
cache, NaN/Inf states flagged on the device, and what it refuses."""

import warnings

import pytest
import torch

import gsq_hf
from gsq_hf import GSQCache
from gsq_hf.formats import QuantizedTensor

CONFIGS = ["fp32", "int8", "int4", "gsq-4bit", "gsq-3bit", "gsq-gate", "gsq-budget", "gsq-entropy",
           {"name": "by-layer", "format": "int4",  # a layer of its own (GSQConfig.layer_overrides)
            "layer_overrides": {1: {"format": "midrise4-e4m3-hadamard", "rounding": "stochastic"}}}]
FIELDS = ("low", "high", "slot_units", "high_valid", "fallback", "fallback_mask", "conv")


def tensors(storage) -> dict[str, torch.Tensor]:
    """Every tensor a layer stores, by field (a quantized tensor's data, scale and row scale)."""
    found = {}
    for name in FIELDS:
        value = getattr(storage, name)
        parts = {"": value} if not isinstance(value, QuantizedTensor) else {
            ".data": value.data, ".scale": value.scale, ".row_scale": value.row_scale}
        found |= {name + part: t for part, t in parts.items() if t is not None}
    return found


def run(model, cache, ids, steps):
    """Logits of the prompt's last position and of ``steps`` greedy decode steps, and each forward's storage."""
    logits, stored = [], []
    out = model(ids, cache=cache, use_cache=True)
    for _ in range(steps + 1):
        logits.append(out.logits[:, -1])
        stored.append([{k: t.clone() for k, t in tensors(layer.storage).items()} for layer in cache.gsq_layers])
        out = model(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
    return torch.stack(logits), stored


@pytest.mark.parametrize("config", CONFIGS)
def test_static_cache_stores_the_same_bytes_in_place(family, model, config):
    gsq_hf.patch(model, config)
    ids = torch.randint(2, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    logits, stored = run(model, GSQCache(model, config), ids, steps=4)
    static = GSQCache(model, config, static=True)
    static_logits, static_stored = run(model, static, ids, steps=4)
    assert torch.equal(static_logits, logits)
    for step_static, step in zip(static_stored, stored, strict=True):  # same fields, bit for bit, every forward
        for a, b in zip(step_static, step, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = [tensors(layer.storage) for layer in static.gsq_layers]
    model(ids[:, :1], cache=static, use_cache=True)  # written into the same tensors
    for layer, held in zip(static.gsq_layers, before, strict=True):
        now = tensors(layer.storage)
        assert now.keys() == held.keys() and all(now[k] is held[k] for k in now)
    dynamic = GSQCache(model, config)
    run(model, dynamic, ids, steps=4)
    model(ids[:, :1], cache=dynamic, use_cache=True)
    assert static.memory_report() == dynamic.memory_report()


def test_static_fp32_logits_match_the_unpatched_model(family, model):
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    reference = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    gsq_hf.patch(model, "fp32")
    out = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         cache=GSQCache(model, "fp32", static=True))
    assert torch.equal(out.sequences, reference.sequences)
    logits, expected = torch.stack(out.logits), torch.stack(reference.logits)
    if family == "mamba":  # docs/design.md's bound for fp32 vs unpatched: Mamba bit for bit, Mamba2 float rounding
        assert torch.equal(logits, expected)
    else:
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def poison_layer_1(model, family):
    """A NaN Δ bias in layer 1: its state goes NaN at the first write."""
    mixer = model.backbone.layers[1].mixer
    with torch.no_grad():
        (mixer.dt_proj.bias if family == "mamba" else mixer.dt_bias)[0] = float("nan")


def test_nonfinite_state_sets_the_device_flag_and_the_forward_raises(family, model):
    poison_layer_1(model, family)
    gsq_hf.patch(model, "int8")
    ids = torch.randint(2, 64, (2, 4))
    static = GSQCache(model, "int8", static=True)
    with pytest.raises(FloatingPointError, match=r"layer\(s\) \[1\] of a static GSQCache"):
        model(ids, cache=static, use_cache=True)
    assert static.nonfinite_layers() == [1]
    static.reset()
    assert static.nonfinite_layers() == []
    static.defer_finite_check = True  # the caller reads the flags itself (generate_graph)
    model(ids, cache=static, use_cache=True)
    model(ids[:, :1], cache=static, use_cache=True)
    assert static.nonfinite_layers() == [1]
    assert static.memory_report()["nonfinite_unit_writes"] == 0  # no fp32 copies: the flag is the record
    with pytest.warns(RuntimeWarning, match="non-finite SSM state in layer 1"):  # the default cache keeps fp32
        report = model(ids, use_cache=True).cache.memory_report()
    assert report["nonfinite_unit_writes"] > 0


def test_finite_states_leave_the_flags_clear(model):
    gsq_hf.patch(model, "int4")
    static = GSQCache(model, "int4", static=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randint(2, 64, (2, 4)), cache=static, use_cache=True)
    assert static.nonfinite_layers() == []
    assert all(layer.nonfinite is not None for layer in static.gsq_layers)


def test_static_cache_refuses_checkpoints_and_a_new_batch(model):
    gsq_hf.patch(model, "int8")
    static = GSQCache(model, "int8", static=True)
    model(torch.randint(2, 64, (3, 4)), cache=static, use_cache=True)
    for call in (static.snapshot, static.record_positions, static.record_inputs):
        with pytest.raises(ValueError, match="overwrites in place; use the default GSQCache"):
            call()
    with pytest.raises(ValueError, match=r"static GSQCache, layer 0: the stored low changed from \(3, .* keeps the "):
        static.batch_select_indices(torch.tensor([0, 2]))


def test_beam_reordering_is_in_place_and_matches_the_default_cache(model):
    gsq_hf.patch(model, "gsq-gate")
    ids = torch.randint(2, 64, (3, 4), generator=torch.Generator().manual_seed(3))
    order = torch.tensor([2, 0, 0])
    logits = []
    for static in (False, True):
        cache = GSQCache(model, "gsq-gate", static=static)
        model(ids, cache=cache, use_cache=True)
        before = cache.gsq_layers[0].storage.low.data  # held: its memory cannot be reused
        cache.reorder_cache(order)
        logits.append(model(ids[:, :1], cache=cache, use_cache=True).logits)
        assert (cache.gsq_layers[0].storage.low.data.data_ptr() == before.data_ptr()) == static
    assert torch.equal(*logits)


@pytest.mark.slow
@pytest.mark.parametrize("family_config", [("mamba", "gsq-4bit", 0.0), ("mamba2", "gsq-gate", 0.0),
                                           ("mamba2", "gsq-4bit", 0.5)])
def test_kernel_steps_on_a_static_cache_match_the_default_cache(family_config):
    """The fused kernel (Triton's interpreter on CPU) on a static cache: its copies copied into the buffers, or
    (contiguous buffers, as on CUDA) written in place, with the step counter of stochastic rounding a device
    scalar; the same logits as the default cache's kernel steps (which take an int step). Held scales: read
    from the buffers the kernel overwrites."""
    import dataclasses
    import os

    from models import FAMILIES

    from gsq_hf.config import resolve_config

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the kernel runs on CPU only under TRITON_INTERPRET=1")
    pytest.importorskip("triton", exc_type=ImportError)
    family, name, hold = family_config
    config = dataclasses.replace(resolve_config(name), kernel="triton", scale_hold=hold)
    model = FAMILIES[family]()
    gsq_hf.patch(model, config)
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(5))
    results = []
    for static, contiguous in ((False, False), (True, False), (True, True)):
        cache = GSQCache(model, config, static=static)
        out = model(ids, cache=cache, use_cache=True)
        if contiguous:  # the CPU scan leaves its states state-dim-outer; CUDA keeps them contiguous
            for layer in cache.gsq_layers:
                layer.storage = layer.storage.map(lambda t: t.contiguous())
        logits = []
        for _ in range(2):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
            logits.append(out.logits)
        assert all(layer.kernel_reason is None for layer in cache.gsq_layers)
        results.append(torch.cat(logits, dim=1))
    assert torch.equal(results[1], results[0]) and torch.equal(results[2], results[0])

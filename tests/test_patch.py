import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

import gsq_hf
from gsq_hf import GSQConfigError, NotPatchedError, UnsupportedModelError, UnsupportedVersionError


def test_model_without_mamba_layers_is_refused():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError, match=r"model_type='llama'.*supported families: mamba \(MambaMixer\), "
                                                    r"mamba2 \(Mamba2Mixer\)"):
        gsq_hf.patch(model, "int8")


def test_patch_twice_and_unpatch_unpatched(model):
    with pytest.raises(NotPatchedError, match="not patched"):
        gsq_hf.unpatch(model)
    gsq_hf.patch(model, "int8")
    assert gsq_hf.is_patched(model)
    with pytest.raises(RuntimeError, match="already patched.*unpatch"):
        gsq_hf.patch(model, "int4")


def test_unknown_preset_and_bad_group_size(model):
    with pytest.raises(GSQConfigError, match="known presets"):
        gsq_hf.patch(model, "int9")
    with pytest.raises(GSQConfigError, match="group_size=3 does not divide d_state=8"):
        gsq_hf.patch(model, {"policy": "static", "format": "int8", "group_size": 3})
    assert not gsq_hf.is_patched(model)


def test_sub_byte_format_needs_a_d_state_it_packs(model):
    """int3 packs 8 codes in 3 bytes; the tiny models' d_state of 8 works, a d_state of 12 does not."""
    gsq_hf.patch(model, "int3")
    gsq_hf.unpatch(model)
    bad = type(model)(type(model.config)(**(model.config.to_dict() | {"state_size": 12})))
    with pytest.raises(GSQConfigError, match="int3 packs 8 codes.*d_state=12"):
        gsq_hf.patch(bad, "int3")
    with pytest.raises(GSQConfigError, match="conv_format='int3'.*window of 4"):
        gsq_hf.patch(model, {"policy": "static", "format": "int8", "conv_format": "int3"})


def test_entropy_policy_needs_lm_head(model):
    with pytest.raises(GSQConfigError, match="no LM head"):
        gsq_hf.patch(model.backbone, "gsq-entropy")
    gsq_hf.patch(model.backbone, "int8")  # a base model works for other policies
    assert model.backbone(torch.randint(0, 64, (1, 4)), use_cache=True).cache is not None


def test_version_outside_range_is_refused(model, monkeypatch):
    from packaging.version import Version

    from gsq_hf import _compat

    monkeypatch.setattr(_compat, "TRANSFORMERS_VERSION", Version("5.10.0"))
    with pytest.raises(UnsupportedVersionError, match=r"supports transformers >=5.24.0,<5.25.0; found"):
        gsq_hf.patch(model, "int8")


def test_cache_filled_by_unpatched_model_is_refused(model):
    ids = torch.randint(0, 64, (1, 4))
    used = model(ids).cache
    assert type(used) is DynamicCache
    gsq_hf.patch(model, "int8")
    with pytest.raises(TypeError, match="already holds states written by an unpatched model"):
        model(ids, cache=used)
    assert isinstance(model(ids, cache=DynamicCache(config=model.config)).cache, gsq_hf.GSQCache)  # fresh: replaced


def test_every_forward_of_a_patched_model_is_quantized(model):
    """use_cache=False and train mode keep no state, but still store it per the config after every token:
    never a silent full-precision forward under a quantized label."""
    ids = torch.randint(0, 64, (2, 6))
    unpatched = model(ids, use_cache=False).logits
    gsq_hf.patch(model, "int4")
    cached = model(ids, use_cache=True)
    assert isinstance(cached.cache, gsq_hf.GSQCache)
    assert not torch.equal(cached.logits, unpatched)  # int4 moves these logits
    no_cache = model(ids, use_cache=False)
    assert torch.equal(no_cache.logits, cached.logits) and no_cache.cache is None
    model.train()  # transformers turns the cache off in train mode
    assert torch.equal(model(ids).logits, cached.logits)
    model.eval()
    assert model._gsq_patch.scratch_cache is None  # nothing kept past the forward
    gsq_hf.unpatch(model)
    assert torch.equal(model(ids, use_cache=False).logits, unpatched)


def test_config_saved_with_model_and_restored(model, tmp_path):
    gsq_hf.patch(model, "gsq-budget")
    model.save_pretrained(tmp_path)
    reloaded = gsq_hf.from_pretrained(tmp_path)
    assert gsq_hf.is_patched(reloaded) and reloaded._gsq_patch.config == gsq_hf.GSQConfig.from_preset("gsq-budget")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    gsq_hf.patch(plain)  # no config given: the saved one
    assert plain._gsq_patch.config.name == "gsq-budget"
    gsq_hf.unpatch(plain)
    assert plain.config.gsq_config["name"] == "gsq-budget"  # unpatch restores what was loaded


def test_config_saved_beside_the_model_is_the_one_applied(model, tmp_path):
    """``GSQConfig.save_pretrained`` into a model directory (``gsq_config.json``) and a patched model's
    ``save_pretrained`` (config.json's ``gsq_config``) are both read back by either loader; two different ones
    are refused, not one silently preferred."""
    model.save_pretrained(tmp_path)
    with pytest.raises(gsq_hf.GSQConfigError, match="no gsq_hf config in .*gsq_config.json"):
        gsq_hf.GSQConfig.from_pretrained(tmp_path)
    int4 = gsq_hf.resolve_config("int4")
    int4.save_pretrained(tmp_path)
    assert gsq_hf.from_pretrained(tmp_path)._gsq_patch.config == int4
    gsq_hf.patch(model, "int8")
    model.save_pretrained(tmp_path / "patched")
    assert gsq_hf.GSQConfig.from_pretrained(tmp_path / "patched") == gsq_hf.resolve_config("int8")
    model.save_pretrained(tmp_path)  # now config.json says int8 and gsq_config.json int4
    gsq_hf.unpatch(model)
    with pytest.raises(gsq_hf.GSQConfigError, match="two different gsq_hf configs: gsq_config.json \\('int4'\\)"):
        gsq_hf.from_pretrained(tmp_path)
    assert gsq_hf.from_pretrained(tmp_path, "fp32")._gsq_patch.config.name == "fp32"  # a config given: no lookup


def test_deepcopy_of_a_patched_model_is_its_own_patched_model(model):
    """The copy is patched with the same config and runs its own weights (a copy of the patch's closures would
    run the original's); a mixer copied on its own is refused; the original stays patched."""
    import copy

    gsq_hf.patch(model, "int8")
    twin = copy.deepcopy(model)
    assert gsq_hf.is_patched(model) and twin._gsq_patch.config == model._gsq_patch.config
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        assert torch.equal(twin(ids).logits, before)
        mixer = next(m for m, _, _ in twin._gsq_patch.mixers)
        mixer.out_proj.weight.zero_()
        assert not torch.equal(twin(ids).logits, before) and torch.equal(model(ids).logits, before)
    with pytest.raises(TypeError, match="cannot be deep-copied on its own"):
        copy.deepcopy(next(m for m, _, _ in model._gsq_patch.mixers))
    gsq_hf.unpatch(model)
    copy.deepcopy(model)  # unpatched: the ordinary deepcopy


@torch.enable_grad()  # conftest runs tests under no_grad
def test_training_through_a_lossy_state_warns_once(model):
    ids = torch.randint(2, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    model.train()
    with gsq_hf.patched(model, "int8"):
        with pytest.warns(UserWarning, match="training through the 'int8' state: no gradient flows back"):
            model(ids, labels=ids).loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(ids, labels=ids)  # once per patch
    with gsq_hf.patched(model, "fp32"), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids, labels=ids).loss.backward()  # lossless: the unpatched gradients, nothing to say
    model.eval()


def test_patched_context_manager(model):
    with gsq_hf.patched(model, "int8") as patched_model:
        assert patched_model is model and gsq_hf.is_patched(model)
    assert not gsq_hf.is_patched(model)


def test_patch_is_scoped_to_the_instance():
    from models import tiny_mamba

    a, b = tiny_mamba(), tiny_mamba()
    ids = torch.randint(0, 64, (1, 5))
    expected = b(ids).logits
    gsq_hf.patch(a, "int4")
    assert torch.equal(b(ids).logits, expected)
    assert type(b(ids).cache) is DynamicCache


def test_composed_formats_patch_account_and_save(model, tmp_path):
    """Formats given by parts run on every family; the report counts every stored bit (payload, e4m3 scales and
    their per-row fp32 second-level scale); fp32 codes with the rotation give the plain logits within float
    rounding (an orthogonal transform and back)."""
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    reference = model(ids, use_cache=False).logits
    with gsq_hf.patched(model, "fp32-hadamard"):
        torch.testing.assert_close(model(ids, use_cache=True).logits, reference, rtol=1e-5, atol=1e-5)
    config = gsq_hf.GSQConfig(policy="static", format={"codes": "midrise3", "scale": "e4m3", "rotation": "hadamard"})
    assert config.policy.format == "midrise3-e4m3-hadamard"
    gsq_hf.patch(model, config)
    out = model(ids, use_cache=True)
    assert not torch.equal(out.logits, reference)
    report = out.cache.memory_report()
    layer = out.cache.gsq_layers[0]
    batch, elements = 2, math.prod(layer.storage.low.shape[1:])  # one row: every unit's d_state values
    assert report["avg_state_bits"] == pytest.approx(3 + 8 / 8 + 32 / elements)  # payload, e4m3 per 8, fp32 per row
    assert layer.storage.low.nbytes == batch * (elements * (3 + 8 / 8) / 8 + 4)  # allocated: packed, e4m3, fp32
    model.save_pretrained(tmp_path)
    assert gsq_hf.from_pretrained(tmp_path)._gsq_patch.config == config


@pytest.mark.parametrize(("preset", "codes_bits"), [("gsq-4bit", 4), ("gsq-3bit", 3)])
def test_low_bit_presets_resolve_per_family(model, preset, codes_bits):
    """Both presets round to nearest on Mamba2 and quasi-randomly on Mamba-1; gsq-4bit stores log8 scales, gsq-3bit
    log8 on Mamba2 and e4m3 on Mamba-1 (chosen per family, docs/formats.md), so b-bit codes + an 8-bit scale
    per d_state group + one fp32 per row (d_state 8 here: b + 1 bits + the row)."""
    gsq_hf.patch(model, preset)
    cache = model(torch.randint(2, 64, (2, 5))).cache
    family = model.config.model_type
    expected = "quasirandom" if family == "mamba" else "nearest"
    scale = "e4m3" if (family, preset) == ("mamba", "gsq-3bit") else "log8"
    assert cache.config.rounding == expected and cache.config.policy.format == f"midrise{codes_bits}-{scale}-hadamard"
    elements = math.prod(cache.gsq_layers[0].storage.low.shape[1:])
    assert cache.memory_report()["avg_state_bits"] == pytest.approx(codes_bits + 8 / 8 + 32 / elements)

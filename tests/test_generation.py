"""Generation conveniences: streamers, a per-call cache (``cache=`` / ``past_key_values=``), inspecting it after."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from models import VOCAB
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import gsq_hf
from gsq_hf import GSQCache


def _ids(batch: int = 2, length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, **kwargs):
    with warnings.catch_warnings():  # transformers 5.24 renamed past_key_values to cache (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              return_dict_in_generate=True, pad_token_id=0, **kwargs)


class _Capture(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.text = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text


def test_text_streamer_with_a_patched_model():
    from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_MODEL_DIR)
    model = gsq_hf.patch(AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR).eval(), "gsq-gate")
    prompt = tokenizer("The for statement is used to", return_tensors="pt").input_ids
    streamer = _Capture(tokenizer)
    streamed = model.generate(prompt, max_new_tokens=12, do_sample=False, streamer=streamer, pad_token_id=0)
    plain = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(streamed, plain)
    assert streamer.text.strip() == tokenizer.decode(streamed[0, prompt.shape[1]:]).strip() != ""


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_per_call_cache_config_without_repatching(model, keyword):
    """A cache passed to generate carries its own config; the output returns that very cache."""
    ids = _ids()
    gsq_hf.patch(model, "fp32")
    cache = GSQCache(model, "int4")
    out = _generate(model, ids, **{keyword: cache})
    assert out.cache is cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert out.past_key_values is cache  # the old name still reads it
    report = cache.memory_report()
    assert report["config"] == "int4" and report["format_fractions"]["int4"] == 1.0
    assert report["weight_bytes"] == model.get_memory_footprint()
    assert report["total_bytes"] == report["weight_bytes"] + report["state_bytes"]
    gsq_hf.unpatch(model)
    gsq_hf.patch(model, "int4")  # the same tokens as a model patched with that config
    assert torch.equal(out.sequences, _generate(model, ids).sequences)
    gsq_hf.unpatch(model)
    gsq_hf.patch(model, "fp32")  # ...and different bytes than the patch's own config
    assert _generate(model, ids).cache.memory_report()["state_bytes"] > report["state_bytes"]


@pytest.mark.parametrize("keyword", ["cache", "cache_params", "past_key_values"])
def test_forward_takes_the_cache_under_any_name(model, keyword):
    gsq_hf.patch(model, "int8")
    cache = GSQCache(model.config, "int8")
    ids = _ids()
    out = model(ids[:, :3], use_cache=True, **{keyword: cache})
    assert out.cache is cache and all(layer.has_state for layer in cache.gsq_layers)
    out = model(ids[:, 3:], use_cache=True, **{keyword: cache})  # continues from the stored state
    assert out.cache is cache
    assert torch.allclose(out.logits, model(ids, use_cache=True).logits[:, 3:], atol=1e-2)


def test_cache_from_model_or_config(model):
    from_model, from_config = GSQCache(model, "int8"), GSQCache(model.config, "int8")
    assert [type(layer) for layer in from_model.layers] == [type(layer) for layer in from_config.layers]
    gsq_hf.patch(model, "int8")
    model(_ids(), cache=from_config, use_cache=True)
    report = from_config.memory_report()
    assert report["weight_bytes"] is None and report["total_bytes"] is None  # it was given no model
    assert from_config.memory_report(model=model)["weight_bytes"] == model.get_memory_footprint()
    assert model(_ids(), use_cache=True).cache.memory_report()["weight_bytes"] == model.get_memory_footprint()


def test_cache_does_not_keep_its_model_alive(family):
    from models import FAMILIES

    model = FAMILIES[family]()
    cache = GSQCache(model, "int8")
    del model
    gc.collect()
    assert cache.memory_report()["weight_bytes"] is None


def test_quasirandom_decoding_does_not_depend_on_the_batch(model):
    """A prompt decoded alone and beside another gets the same logits up to float rounding of the batched
    matmuls with quasi-random rounding (its thresholds index within a batch row), where stochastic rounding's
    draws, which depend on the row, move them by far more."""
    alone, other = _ids(1, 6, seed=1), _ids(1, 6, seed=2)
    gaps = {}
    for rounding in ("quasirandom", "stochastic"):
        gsq_hf.patch(model, {"policy": "static", "format": "midrise4-e4m3-hadamard", "rounding": rounding})
        single, batched = _generate(model, alone, output_logits=True), _generate(
            model, torch.cat([other, alone]), output_logits=True)
        if rounding == "quasirandom":
            assert torch.equal(single.sequences[0], batched.sequences[1])
        gaps[rounding] = max((a[0] - b[1]).abs().max().item() for a, b in zip(single.logits, batched.logits,
                                                                               strict=True))
        gsq_hf.unpatch(model)
    assert gaps["quasirandom"] < 1e-5 and gaps["stochastic"] > 1e-4, gaps

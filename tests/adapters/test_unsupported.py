"""Recurrent families whose state is not a Mamba SSM state are refused, naming the layer type found."""

import glob
import importlib.util
import os
import re

import pytest
import torch
import transformers
from torch import nn

import gsq_hf
from gsq_hf.adapters import ADAPTERS
from gsq_hf.adapters.unsupported import REFUSED

SMALL = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)
ATTENTION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2)

# family -> (config class, model class, config kwargs): a tiny model for every kind of refused layer but Zaya's
# compressed convolutional attention (its class name is checked below like every other one)
REFUSED_MODELS = {
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(ATTENTION, layer_types=["linear_attention", "full_attention"], head_dim=8,
                        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                        linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32)),
    "olmo_hybrid": ("OlmoHybridConfig", "OlmoHybridForCausalLM", ATTENTION),
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM",
                    dict(ATTENTION, num_experts=2, num_experts_per_token=1, moe_intermediate_size=32,
                         linear_num_heads=2, linear_head_dim=8, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
                         qk_nope_head_dim=8)),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", dict(ATTENTION, num_local_experts=2, num_experts_per_tok=1)),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(ATTENTION, layer_types=["conv", "full_attention"])),
    "rwkv": ("RwkvConfig", "RwkvForCausalLM",
             dict(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64)),
    "xlstm": ("xLSTMConfig", "xLSTMForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_heads=2)),
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=1, lru_width=32, block_types=["recurrent", "attention"])),
}

# Classes that write a conv state into the cache without being a sequence mixer: Qwen4Exp's token-id windows of its
# n-gram / per-layer embeddings. Qwen4Exp models are refused through their gated delta-net layers.
NOT_MIXERS = {"Qwen4ExpTextNGramEmbedding", "Qwen4ExpTextPLELayer"}


def modeling_source(family: str) -> str:
    spec = importlib.util.find_spec(f"transformers.models.{family}.modeling_{family}")
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("family", sorted(REFUSED_MODELS))
def test_real_model_is_refused_naming_its_layer_type(family):
    config_class, model_class, kwargs = REFUSED_MODELS[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**SMALL, **kwargs))
    entry = next(e for e in REFUSED if family in e.families)
    present = {type(m).__name__ for m in model.modules()} & set(entry.mixer_classes)
    assert present
    with pytest.raises(gsq_hf.UnsupportedModelError) as raised:
        gsq_hf.patch(model, "int8")
    message = str(raised.value)
    assert message.startswith(f"{entry.kind} layers ({', '.join(sorted(present))}) are not a Mamba SSM state: ")
    assert "supported families: mamba (MambaMixer), mamba2 (Mamba2Mixer)" in message
    assert not gsq_hf.is_patched(model)


@pytest.mark.parametrize("kind,name", [(e.kind, name) for e in REFUSED for name in e.mixer_classes])
def test_every_refused_layer_class_is_named(kind, name):
    model = nn.Sequential(type(name, (nn.Module,), {})())
    with pytest.raises(gsq_hf.UnsupportedModelError, match=rf"^{kind} layers \({name}\) are not a Mamba SSM state"):
        gsq_hf.patch(model, "int8")


def test_refused_classes_exist_in_the_installed_transformers():
    for entry in REFUSED:
        assert not set(entry.families) & set(ADAPTERS)
        sources = "\n".join(modeling_source(family) for family in entry.families)
        for name in entry.mixer_classes:
            assert re.search(rf"^\s*class {name}\(", sources, re.MULTILINE), name


def test_every_cache_writing_layer_of_transformers_is_adapted_or_refused():
    """Scans the installed transformers: a class that writes a conv or recurrent state into the cache must be a
    registered adapter's mixer or a refused layer, so a new recurrent family cannot slip through unnoticed."""
    handled = {name for cls in ADAPTERS.values() for name in cls.mixer_classes}
    handled |= {name for entry in REFUSED for name in entry.mixer_classes} | NOT_MIXERS
    models_dir = os.path.dirname(importlib.util.find_spec("transformers.models").origin)
    writers = set()
    for path in glob.glob(os.path.join(models_dir, "*", "modeling_*.py")):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        if "update_recurrent_state" in source or "update_conv_state" in source:
            for block in re.split(r"\n(?=class )", source):
                if re.search(r"\.update_(conv|recurrent)_state\(", block):
                    writers.add(re.match(r"class (\w+)", block).group(1))
    assert writers and writers <= handled, sorted(writers - handled)

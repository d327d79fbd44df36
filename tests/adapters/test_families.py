"""Every Mamba-family architecture of transformers 5.24 beyond Mamba/Mamba2: FalconMamba and the hybrids.

Each TEST_CASES entry is a tiny random model built from the family's own config class (no download): hidden 32,
2-4 layers, d_state 8, weights drawn with std 0.2 so that the SSM state visibly drives the logits (a 4-bit state
moves them by 8e-4 to 0.6 of max |logit|).

Tolerance of the lossless checks: max |Δlogit| <= 1e-5 * max |logit|, float32 rounding: the Mamba2-style families
run a token-by-token recurrence where upstream runs a chunked scan, and upstream's own decode path differs from its
full forward by up to 4e-6 on these models. Measured per family: docs/support.md (at most 4e-6).
"""

import math
import os

import pytest
import torch
from transformers import (
    BambaConfig,
    BambaForCausalLM,
    FalconH1Config,
    FalconH1ForCausalLM,
    FalconMambaConfig,
    FalconMambaForCausalLM,
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
    Zamba2Config,
    Zamba2ForCausalLM,
    ZambaConfig,
    ZambaForCausalLM,
)
from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

import gsq_hf
from gsq_hf.adapters import find_adapter

VOCAB = 64
RTOL = 1e-5
COMMON = dict(vocab_size=VOCAB, hidden_size=32, pad_token_id=0, eos_token_id=1, bos_token_id=1, initializer_range=0.2)
MAMBA2_HEADS = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
                    mamba_expand=2, mamba_chunk_size=4)
ATTENTION = dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)

# case -> (family, config class, model class, config kwargs)
TEST_CASES = {
    "falcon_mamba": ("falcon_mamba", FalconMambaConfig, FalconMambaForCausalLM,
                     dict(num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, time_step_rank=4)),
    "jamba": ("jamba", JambaConfig, JambaForCausalLM,
              dict(ATTENTION, num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                   expert_layer_offset=1, num_experts=2, num_experts_per_tok=1, mamba_d_state=8, mamba_d_conv=4,
                   mamba_expand=2, mamba_dt_rank=4)),
    "zamba": ("zamba", ZambaConfig, ZambaForCausalLM,
              dict(ATTENTION, num_hidden_layers=4, num_attention_heads=2, attention_head_dim=32, n_mamba_heads=2,
                   mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
                   layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"])),
    "zamba2": ("zamba2", Zamba2Config, Zamba2ForCausalLM,
               dict(ATTENTION, num_hidden_layers=4, num_attention_heads=2, num_mem_blocks=1, n_mamba_heads=8,
                    mamba_ngroups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, chunk_size=4,
                    layers_block_type=["mamba", "hybrid", "mamba", "hybrid"])),
    "bamba": ("bamba", BambaConfig, BambaForCausalLM,
              dict(ATTENTION, **MAMBA2_HEADS, num_hidden_layers=4, attn_layer_indices=[1, 3])),
    "nemotron_h": ("nemotron_h", NemotronHConfig, NemotronHForCausalLM,
                   dict(ATTENTION, head_dim=8, layers_block_type=["mamba", "attention", "mamba", "mlp"],
                        ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, conv_kernel=4,
                        chunk_size=4)),
    "falcon_h1": ("falcon_h1", FalconH1Config, FalconH1ForCausalLM,
                  dict(ATTENTION, **MAMBA2_HEADS, num_hidden_layers=2, mamba_d_ssm=64, ssm_in_multiplier=0.7,
                       ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 2.0])),
    "falcon_h1-rms_norm": ("falcon_h1", FalconH1Config, FalconH1ForCausalLM,
                           dict(ATTENTION, **MAMBA2_HEADS, num_hidden_layers=2, mamba_d_ssm=64, mamba_rms_norm=True,
                                mamba_norm_before_gate=False)),
    "granitemoehybrid": ("granitemoehybrid", GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM,
                         dict(ATTENTION, **MAMBA2_HEADS, shared_intermediate_size=64, num_hidden_layers=4,
                              layer_types=["mamba", "attention", "mamba", "attention"], num_local_experts=2,
                              num_experts_per_tok=1)),
}
# Upstream's single-token decode skips the clamp of Δ to ``time_step_limit`` that its own prefill applies; Zamba2
# and NemotronH clamp at time_step_min = 1e-3, so there upstream's decode drifts from its own full forward. The
# adapter clamps at every step, as the full forward does: for these two it is compared with the full forward only.
DECODE_SKIPS_DT_CLAMP = {"zamba2", "nemotron_h"}


def build(case: str):
    _, config_class, model_class, kwargs = TEST_CASES[case]
    torch.manual_seed(0)
    return model_class(config_class(**COMMON, **kwargs)).eval()


@pytest.fixture(params=sorted(TEST_CASES))
def case(request):
    return request.param


@pytest.fixture
def model(case):
    return build(case)


def ids_(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


def stepwise_logits(model, ids: torch.Tensor, chunked_tail: bool) -> torch.Tensor:
    """Prefill 6 tokens, decode 3 one at a time, then (``chunked_tail``) the rest in one forward on the cache.

    Positions are passed explicitly: Bamba does not offset them by the cache length.
    """
    out = model(ids[:, :6])
    steps = [out.logits]
    bounds = [6, 7, 8, 9] + ([ids.shape[1]] if chunked_tail else [])
    for start, end in zip(bounds, bounds[1:], strict=False):
        out = model(ids[:, start:end], cache=out.cache, position_ids=torch.arange(start, end)[None])
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


def test_every_mixer_gets_its_family_adapter(case, model):
    mixers = [m for m in model.modules() if find_adapter(m) is not None]
    assert mixers and {find_adapter(m).family for m in mixers} == {TEST_CASES[case][0]}
    gsq_hf.patch(model, "fp32")
    assert all("forward" in m.__dict__ for m in mixers)


@pytest.mark.parametrize("batch", [2, 1])  # batch 1: other CPU kernels, float rounding (docs/support.md)
def test_lossless_logits_full_forward_and_prefill_decode(case, model, batch):
    ids = ids_(batch, 12, seed=1)
    reference = model(ids, use_cache=False).logits
    upstream_steps = stepwise_logits(model, ids, chunked_tail=False)
    gsq_hf.patch(model, "fp32")
    out = model(ids)
    assert isinstance(out.cache, gsq_hf.GSQCache)
    assert relative_error(out.logits, reference) <= RTOL
    steps = stepwise_logits(model, ids, chunked_tail=True)
    assert relative_error(steps, reference) <= RTOL
    if case not in DECODE_SKIPS_DT_CLAMP:
        assert relative_error(steps[:, :9], upstream_steps) <= RTOL
    elif batch > 1:  # upstream's decode skips the Δ clamp: these rows show its drift (one row may not)
        assert relative_error(upstream_steps, reference[:, :9]) > RTOL


def test_quantized_state_moves_the_logits(model):
    """The lossless checks can fail: a 4-bit state moves these logits far beyond their tolerance."""
    ids = ids_(2, 12, seed=1)
    reference = model(ids, use_cache=False).logits
    gsq_hf.patch(model, "int4")
    assert relative_error(model(ids).logits, reference) > 30 * RTOL


def test_forward_without_a_cache_is_quantized_too(model):
    """use_cache=False / train mode: the states still go through the config (no silent full precision)."""
    ids = ids_(2, 12, seed=1)
    gsq_hf.patch(model, "int4")
    cached = model(ids, use_cache=True).logits
    assert torch.equal(model(ids, use_cache=False).logits, cached)
    model.train()
    assert torch.equal(model(ids).logits, cached)


def test_chunked_evaluation_equals_stepping(model):
    from eval.test_perplexity import check_chunked_equals_stepped

    check_chunked_equals_stepped(model)


def test_greedy_generate_same_tokens_with_left_padding(model):
    ids = ids_(3, 8, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :5] = 0
    ids[mask == 0] = 0
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    gsq_hf.patch(model, "fp32")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert isinstance(out.cache, gsq_hf.GSQCache)


@pytest.mark.parametrize("preset", ["int8", "gsq-gate", "gsq-entropy", "gsq-budget"])
def test_quantized_generate_greedy_sampling_beams(model, preset):
    ids = ids_(2, 5, seed=3)
    gsq_hf.patch(model, preset)
    for kwargs in (dict(do_sample=False), dict(do_sample=True, top_k=5), dict(num_beams=2, do_sample=False)):
        out = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True, **kwargs)
        assert out.sequences.shape == (2, 9)
        report = out.cache.memory_report()
        assert 0 < report["state_bytes"] < report["full_precision_state_bytes"]
        assert sum(report["format_fractions"].values()) == pytest.approx(1.0)


def test_memory_report_counts_states_and_reports_the_kv_cache_beside_them(model):
    """fp32 state bytes are exactly what transformers' own cache holds in its conv/recurrent states; the KV
    cache of the attention layers is reported apart (``attention_kv_bytes``), never inside ``state_bytes``."""
    ids = ids_(2, 7, seed=4)
    upstream = model(ids).cache
    states = [layer for layer in upstream.layers if isinstance(layer, LinearAttentionCacheLayerMixin)]
    state_bytes = sum(t.nbytes for layer in states for t in (*layer.conv_states.values(),
                                                              *layer.recurrent_states.values()) if t is not None)
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in upstream.layers
                   if isinstance(layer, CacheLayerMixin) and layer.is_initialized)
    gsq_hf.patch(model, "fp32")
    report = model(ids).cache.memory_report()
    assert report["state_bytes"] == report["full_precision_state_bytes"] == state_bytes
    assert report["attention_kv_bytes"] == kv_bytes
    assert len(report["layers"]) == len(states)
    assert (kv_bytes > 0) == any(isinstance(layer, CacheLayerMixin) for layer in upstream.layers)


def test_unpatch_restores_exact_original(model):
    ids = ids_(2, 7, seed=5)
    before = model(ids).logits
    mixers = [m for m in model.modules() if find_adapter(m) is not None]
    gsq_hf.patch(model, "int4")
    gsq_hf.unpatch(model)
    assert all("forward" not in m.__dict__ for m in mixers)
    out = model(ids)
    assert torch.equal(out.logits, before)
    assert type(out.cache).__name__ == "DynamicCache"


def test_deepcopy_runs_its_own_weights(model):
    """A deep copy of a patched model is patched again over its own mixers (tests/test_patch.py has the rest)."""
    import copy

    ids = ids_(2, 7, seed=6)
    gsq_hf.patch(model, "int4")
    twin = copy.deepcopy(model)
    before = model(ids).logits
    assert torch.equal(twin(ids).logits, before)
    for mixer in (m for m in twin.modules() if find_adapter(m) is not None):
        mixer.out_proj.weight.data.zero_()
    assert not torch.equal(twin(ids).logits, before) and torch.equal(model(ids).logits, before)


def test_packed_sequences_are_refused_with_a_state_cache():
    model = gsq_hf.patch(build("granitemoehybrid"), "fp32")  # its decoder layer forwards seq_idx to the mixer
    ids = ids_(1, 6, seed=6)
    with pytest.raises(ValueError, match=r"packed sequences \(seq_idx\)"):
        model(ids, seq_idx=torch.zeros_like(ids, dtype=torch.int32))


def test_decode_faithful_evaluation_runs(model):
    """`gsq-hf eval`'s engine on every family: fp32 equals the full forward; quantized configs are scored."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
    from evalkit import word_text, word_tokenizer

    from gsq_hf.eval import decode_faithful_perplexity, full_sequence_perplexity, make_windows

    windows = make_windows(word_tokenizer(), word_text(120), context=24, max_tokens=96)
    reference = full_sequence_perplexity(model, windows, batch_size=4, progress=False)
    lossless = decode_faithful_perplexity(model, windows, "fp32", batch_size=4, progress=False)
    assert lossless.nll_sum == pytest.approx(reference.nll_sum, rel=1e-5)
    for preset in ("int8", "gsq-gate"):
        result = decode_faithful_perplexity(model, windows, preset, batch_size=4, progress=False)
        assert result.tokens == reference.tokens and math.isfinite(result.perplexity)
        assert result.state["state_bytes"] < result.state["full_precision_state_bytes"]


def test_speculative_greedy_equals_plain_generate(model):
    """Self-speculative decoding is exact on every family (attention KV of hybrids is cropped on rollback)."""
    from gsq_hf.speculative import speculative_generate

    ids = ids_(1, 6, seed=11)
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    for rollback in ("checkpoints", "recompute", "replay"):
        out = speculative_generate(model, ids, draft="int4", lookahead=4, max_new_tokens=12, rollback=rollback)
        assert torch.equal(out.sequences, expected), rollback


@pytest.mark.parametrize("draft_sync", ["once", "rejection", "every_round"])
def test_speculative_batch_with_left_padding(case, model, draft_sync):
    """Batch 4, prompts of different lengths, a noisy draft (rows reject at different places): each row equals plain
    greedy ``generate``; a hybrid's attention KV is compacted per row after each round (kept entries right-aligned,
    the left padding of the mask extended) and every forward gets each row's own positions."""
    from test_speculative import noisy

    from gsq_hf.speculative import speculative_generate

    ids = ids_(4, 8, seed=12)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[3, :5] = 0
    ids[mask == 0] = 0
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    gsq_hf.patch(model, "fp32")
    handle = noisy(model, 0.3)
    try:
        for rollback in ("checkpoints", "recompute", "replay"):
            out = speculative_generate(model, ids, attention_mask=mask, draft="int4", lookahead=4, max_new_tokens=12,
                                       rollback=rollback, draft_sync=draft_sync)
            assert torch.equal(out.sequences, expected), rollback
            assert out.stats.rollbacks > 0 and out.stats.accepted > 0, out.stats  # rows commit different prefixes
    finally:
        handle.remove()


def test_fused_kernel_decode_matches_the_torch_path(case, model, monkeypatch):
    """Every family's decode steps through the Triton kernel (interpreter on CPU) give the torch path's tokens;
    Zamba's multi-head Mamba-1 (A per head row) stays on torch."""
    pytest.importorskip("triton", exc_type=ImportError)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel needs CUDA or TRITON_INTERPRET=1")
    import gsq_hf.kernels.state_update as kernel_module

    calls = []
    original = kernel_module.state_update
    monkeypatch.setattr(kernel_module, "state_update", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = ids_(2, 6, seed=4)
    gsq_hf.patch(model)
    runs = {}
    for kernel in ("torch", "triton"):
        cache = gsq_hf.GSQCache(model, {"policy": "static", "format": "int8", "kernel": kernel})
        runs[kernel] = model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache, output_scores=True,
                                      return_dict_in_generate=True)
    assert torch.equal(runs["triton"].sequences, runs["torch"].sequences)
    for a, b in zip(runs["triton"].scores, runs["torch"].scores, strict=True):
        assert relative_error(a, b) <= 1e-3  # an int8 code may move at a rounding tie
    assert bool(calls) == (TEST_CASES[case][0] != "zamba")


def test_layer_overrides_by_model_layer_index(model):
    """`GSQConfig.layer_overrides` keys are the model's layer indices (as ``mixer.layer_idx``): the last Mamba
    layer keeps its own format in every family; an index of an attention-only layer is refused by name."""
    from gsq_hf.patch import patchable_mixers

    layers = sorted(mixer.layer_idx for mixer, _ in patchable_mixers(model))
    gsq_hf.patch(model, gsq_hf.GSQConfig(format="int4", layer_overrides={layers[-1]: {"format": "fp32"}}))
    cache = model(ids_(1, 5, 0)).cache
    stored = {index: layer.storage.low.fmt.name for index, layer in enumerate(cache.layers)
              if layer in cache.gsq_layers}
    assert stored == {index: "fp32" if index == layers[-1] else "int4" for index in layers}
    gsq_hf.unpatch(model)
    others = sorted(set(range(model.config.num_hidden_layers)) - set(layers))
    if others:
        with pytest.raises(gsq_hf.GSQConfigError, match=rf"layer\(s\) \[{others[0]}\], which hold no Mamba state"):
            gsq_hf.patch(model, gsq_hf.GSQConfig(layer_overrides={others[0]: {"format": "int8"}}))

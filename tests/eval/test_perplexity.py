"""Decode-faithful perplexity: equivalence with the ordinary forward, metrics, state memory, non-finite logits,
position buckets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from models import VOCAB, tiny_mamba

import gsq_hf
from gsq_hf.eval import (
    NonFiniteLogitsError,
    PerplexityResult,
    decode_faithful_perplexity,
    full_sequence_perplexity,
    make_windows,
)
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR, builtin_text
from gsq_hf.eval.data import load_model, load_tokenizer
from gsq_hf.eval.perplexity import bucket_labels, log_position_buckets

# fp32 decode vs one full-sequence forward: the same math in another summation order (Mamba2's reference
# forward is the chunked SSD scan). Measured on these models: ΣNLL within 6e-9 and perplexity within 3e-8
# relative (contexts 40 and 256); 1e-6 leaves 30x room for other CPUs and BLAS builds.
EQUIVALENCE_RTOL = 1e-6


def test_fp32_decode_equals_full_sequence_forward(model, tokenizer, text):
    """The key equivalence: storing every state exactly changes nothing, batch by batch and window by window."""
    windows = make_windows(tokenizer, text, context=40, max_tokens=200)  # 5 windows: batches of 2, 2, 1
    reference = full_sequence_perplexity(model, windows, batch_size=5, progress=False)
    decoded = decode_faithful_perplexity(model, windows, "fp32", batch_size=2, progress=False)
    assert decoded.tokens == reference.tokens == 5 * 39
    assert decoded.nll_sum == pytest.approx(reference.nll_sum, rel=EQUIVALENCE_RTOL)
    assert decoded.perplexity == pytest.approx(reference.perplexity, rel=EQUIVALENCE_RTOL)
    assert not gsq_hf.is_patched(model)  # patched for the run only


def test_tokenizer_and_text_give_the_same_windows(tokenizer, text):
    model = tiny_mamba()
    windows = make_windows(tokenizer, text, context=32, max_tokens=96)
    from_windows = decode_faithful_perplexity(model, windows, "int8", progress=False)
    from_text = decode_faithful_perplexity(model, tokenizer, "int8", text=text, context=32, max_tokens=96,
                                           progress=False)
    assert from_text.nll_sum == from_windows.nll_sum


def test_already_patched_model_keeps_its_patch_and_uses_the_given_config(tokenizer, text):
    model = gsq_hf.patch(tiny_mamba(), "int4")
    windows = make_windows(tokenizer, text, context=16, max_tokens=32)
    result = decode_faithful_perplexity(model, windows, "fp32", progress=False)
    assert gsq_hf.is_patched(model)
    assert result.state["avg_state_bits"] == 32.0


def test_metrics_from_sums_by_hand():
    nll = 6 * math.log(2)
    result = PerplexityResult("hand", nll_sum=nll, tokens=6, words=3, bytes=12, seconds=2.0)
    assert result.perplexity == pytest.approx(2.0)  # exp(6 ln2 / 6)
    assert result.word_perplexity == pytest.approx(4.0)  # exp(6 ln2 / 3)
    assert result.byte_perplexity == pytest.approx(math.sqrt(2))  # exp(6 ln2 / 12)
    assert result.bits_per_byte == pytest.approx(0.5)  # 6 ln2 / (12 ln2)
    assert result.tokens_per_second == 3.0


def test_uniform_model_by_hand(tokenizer):
    """Zero logits predict every token with p = 1/V: ΣNLL = tokens · ln V, whatever the state config."""
    model = tiny_mamba()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    windows = make_windows(tokenizer, "w0 w1 w2 w3 w4 w5 w6 w7 w8", context=4)  # w8 is the dropped tail
    assert windows.ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    # scored text per window: "w1 w2 w3" and "w5 w6 w7": 3 words and 8 bytes each
    assert windows.words.tolist() == [3, 3] and windows.bytes.tolist() == [8, 8]
    for result in (full_sequence_perplexity(model, windows, progress=False),
                   decode_faithful_perplexity(model, windows, "int4", progress=False),
                   decode_faithful_perplexity(model, windows, "gsq-entropy", progress=False)):
        assert result.tokens == 6 and result.words == 6 and result.bytes == 16
        assert result.nll_sum == pytest.approx(6 * math.log(VOCAB), rel=1e-6)
        assert result.perplexity == pytest.approx(VOCAB, rel=1e-6)
        assert result.word_perplexity == pytest.approx(VOCAB, rel=1e-6)
        assert result.byte_perplexity == pytest.approx(VOCAB ** (6 / 16), rel=1e-6)
        assert result.bits_per_byte == pytest.approx(6 * math.log2(VOCAB) / 16, rel=1e-6)


def test_state_memory_is_per_sequence(tokenizer, text):
    model = tiny_mamba()
    windows = make_windows(tokenizer, text, context=16, max_tokens=64)
    fp32_one = decode_faithful_perplexity(model, windows, "fp32", batch_size=1, progress=False).state
    fp32_four = decode_faithful_perplexity(model, windows, "fp32", batch_size=4, progress=False).state
    int8 = decode_faithful_perplexity(model, windows, "int8", batch_size=4, progress=False).state
    assert fp32_one["state_bytes"] == fp32_four["state_bytes"] == fp32_four["full_precision_state_bytes"]
    # 2 layers x (SSM 64 channels x 8 fp32 + conv 64 x 4 fp32) per sequence
    assert fp32_four["state_bytes"] == 2 * (64 * 8 * 4 + 64 * 4 * 4)
    assert int8["state_bytes"] < int8["full_precision_state_bytes"] == fp32_four["state_bytes"]
    assert int8["avg_state_bits"] == 12.0  # int8 codes + one fp32 scale per 8 values
    assert int8["format_fractions"]["int8"] == 1.0 and int8["nonfinite_unit_writes"] == 0


def test_nonfinite_logits_raise_and_name_the_windows(tokenizer, text):
    model = tiny_mamba()
    windows = make_windows(tokenizer, text, context=8, max_tokens=32)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")  # tied to the embedding of token 3: logits go NaN after it
    with pytest.raises(NonFiniteLogitsError, match=r"fp32: NaN/Inf next-token logits in window\(s\) \[") as info, \
            pytest.warns(RuntimeWarning, match="non-finite SSM state"):
        decode_faithful_perplexity(model, windows, "fp32", batch_size=2, progress=False)
    assert not gsq_hf.is_patched(model)
    with pytest.raises(NonFiniteLogitsError, match="reference"):
        full_sequence_perplexity(model, windows, progress=False)
    assert "perplexity is undefined" in str(info.value)


def test_log_position_buckets_and_labels():
    assert log_position_buckets(16384) == [0, 256, 1024, 4096]  # 16384 would hold no position of the window
    assert log_position_buckets(16385) == [0, 256, 1024, 4096, 16384]
    assert log_position_buckets(256) == [0] and log_position_buckets(40, first=8, factor=2) == [0, 8, 16, 32]
    assert bucket_labels([0, 256, 1024], [256, 1024, 1500]) == ["1–255", "256–1023", "1024–1499"]


def test_position_buckets_match_per_position_nll_of_the_forward(model, tokenizer, text):
    """Each bucket holds exactly its positions (checked against the full forward's per-token NLL), the buckets
    add up to the total, and asking for them leaves the total unchanged."""
    windows = make_windows(tokenizer, text, context=40, max_tokens=200)  # 5 windows: batches of 2, 2, 1
    plain = decode_faithful_perplexity(model, windows, "fp32", batch_size=2, progress=False)
    result = decode_faithful_perplexity(model, windows, "fp32", batch_size=2, progress=False,
                                        position_buckets=[0, 8, 16, 32, 64])  # 64 >= context: dropped
    buckets = result.positions
    assert plain.positions is None and "position_buckets" not in plain.to_dict()
    assert result.nll_sum == plain.nll_sum
    assert buckets.starts == (0, 8, 16, 32) and buckets.ends == (8, 16, 32, 40)
    assert buckets.tokens == (5 * 7, 5 * 8, 5 * 16, 5 * 8)  # position 0 is never scored
    assert sum(buckets.tokens) == result.tokens
    assert sum(buckets.nll_sum) == pytest.approx(result.nll_sum, rel=1e-12)

    logits = model(input_ids=windows.ids).logits[:, :-1].float()
    per_position = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows.ids[:, 1:],
                                                     reduction="none").double()  # (windows, positions 1..39)
    expected = torch.stack([per_position[:, max(start, 1) - 1 : end - 1].sum(dim=1)
                            for start, end in zip(buckets.starts, buckets.ends, strict=True)], dim=1)
    torch.testing.assert_close(torch.tensor(buckets.window_nll_sum, dtype=torch.float64), expected,
                               rtol=EQUIVALENCE_RTOL, atol=0.0)  # (windows, buckets)
    assert buckets.nll_sum == pytest.approx(expected.sum(dim=0).tolist(), rel=EQUIVALENCE_RTOL)
    assert result.to_dict()["position_buckets"]["perplexity"] == pytest.approx(
        (expected.sum(dim=0) / torch.tensor(buckets.tokens)).exp().tolist(), rel=EQUIVALENCE_RTOL)


@pytest.mark.parametrize("starts", [[], [1, 8], [0, 8, 8], [0, 16, 8]])
def test_position_buckets_must_be_increasing_starts_from_zero(tokenizer, text, starts):
    windows = make_windows(tokenizer, text, context=16, max_tokens=16)
    with pytest.raises(ValueError, match="increasing bucket starts beginning at 0"):
        decode_faithful_perplexity(tiny_mamba(), windows, "fp32", progress=False, position_buckets=starts)


# -- fidelity to a reference run: KL(reference ‖ config) over the reference's top-k, top-1 agreement ----------
def _step_logits(model, windows, config) -> torch.Tensor:
    """Every scored step's next-token logits, stepped here by hand (one cache per run): (windows, steps, V)."""
    from gsq_hf.cache import GSQCache
    from gsq_hf.config import resolve_config

    cfg = resolve_config(config)
    with torch.inference_mode(), gsq_hf.patched(model, cfg):
        cache = GSQCache(model.config, cfg)
        return torch.stack([model(input_ids=windows.ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1]
                            for t in range(windows.context - 1)], dim=1).float()


def test_kl_to_itself_is_zero_and_top1_agrees(model, tokenizer, text):
    """A config scored against its own run: the stored states are the same, so are the logits: KL exactly 0."""
    windows = make_windows(tokenizer, text, context=24, max_tokens=96)
    for config in ("fp32", "int4"):
        kept = decode_faithful_perplexity(model, windows, config, batch_size=2, keep_reference=5, progress=False)
        again = decode_faithful_perplexity(model, windows, config, batch_size=2, reference=kept.reference,
                                           progress=False)
        assert again.nll_sum == kept.nll_sum and again.kl_divergence == 0.0 and again.top1_agreement == 1.0
        assert kept.kl_divergence is None and "kl_divergence" not in kept.to_dict()


def test_full_vocabulary_kl_is_the_kl_of_the_logits():
    """k = vocabulary: the exact KL, against one computed by hand from logits stepped independently; a small k
    gives a lower bound; top-1 agreement counted by hand. On the built-in trained model: a random tiny model's
    predictions barely depend on its state (KL ~1e-13 at int2)."""
    model = load_model(str(BUILTIN_MODEL_DIR), "fp32", "cpu")
    windows = make_windows(load_tokenizer(str(BUILTIN_MODEL_DIR)), builtin_text("test"), context=32, max_tokens=128)
    p_logits, q_logits = _step_logits(model, windows, "fp32"), _step_logits(model, windows, "int2")
    log_p, log_q = (F.log_softmax(x.double(), dim=-1) for x in (p_logits, q_logits))
    exact = float((log_p.exp() * (log_p - log_q)).sum()) / windows.scored_tokens
    agree = float((p_logits.argmax(-1) == q_logits.argmax(-1)).double().mean())
    assert exact > 1e-3 and agree < 0.95  # int2 moves the predictions: the comparisons below are not 0 == 0

    full = decode_faithful_perplexity(model, windows, "fp32", keep_reference=model.config.vocab_size,
                                      progress=False)
    scored = decode_faithful_perplexity(model, windows, "int2", reference=full.reference, progress=False)
    assert scored.kl_divergence == pytest.approx(exact, rel=1e-9)
    assert scored.top1_agreement == pytest.approx(agree)
    per_window = (log_p.exp() * (log_p - log_q)).sum(dim=(1, 2)) / (windows.context - 1)
    assert scored.kl_stderr == pytest.approx(float(per_window.std() / math.sqrt(len(per_window))), rel=1e-9)

    bounds = []
    for k in (1, 4, 16):
        top = decode_faithful_perplexity(model, windows, "fp32", keep_reference=k, progress=False)
        bounds.append(decode_faithful_perplexity(model, windows, "int2", reference=top.reference,
                                                 progress=False).kl_divergence)
    assert 0 < bounds[0] <= bounds[1] <= bounds[2] <= exact * (1 + 1e-9)  # a finer partition: a larger KL


def test_kl_by_position_bucket_adds_up(tokenizer, text):
    model = tiny_mamba(seed=1)
    windows = make_windows(tokenizer, text, context=40, max_tokens=120)
    kept = decode_faithful_perplexity(model, windows, "fp32", keep_reference=8, progress=False)
    scored = decode_faithful_perplexity(model, windows, "int3", reference=kept.reference, progress=False,
                                        position_buckets=[0, 8, 20])
    buckets = scored.positions
    assert [len(row) for row in buckets.window_kl_sum] == [3] * 3
    assert sum(map(sum, buckets.window_kl_sum)) == pytest.approx(scored.kl_divergence * scored.tokens, rel=1e-12)
    assert buckets.to_dict()["kl_divergence"] == pytest.approx(
        [sum(col) / n for col, n in zip(zip(*buckets.window_kl_sum, strict=True), buckets.tokens, strict=True)])
    assert all(kl > 0 for kl in buckets.kl_divergence)


def test_reference_errors(tokenizer, text):
    model = tiny_mamba()
    windows = make_windows(tokenizer, text, context=16, max_tokens=64)
    other = make_windows(tokenizer, text, context=16, max_tokens=48)
    kept = decode_faithful_perplexity(model, windows, "fp32", keep_reference=2, progress=False)
    with pytest.raises(ValueError, match="other token windows"):
        decode_faithful_perplexity(model, other, "int8", reference=kept.reference, progress=False)
    for bad in (0, VOCAB + 1, 2.5):
        with pytest.raises(ValueError, match=f"keep_reference= is the number of top logits kept per token, 1..{VOCAB}"):
            decode_faithful_perplexity(model, windows, "fp32", keep_reference=bad, progress=False)


def test_wrong_arguments_are_said_before_any_forward(tokenizer, text):
    """A tokenizer in the model's place, a result for reference=, a batch size < 1, windows of another tokenizer's
    ids: one clear error each (not a torch error from inside the forward)."""
    from gsq_hf.eval import EvalInputError, TokenWindows

    model = tiny_mamba()
    windows = make_windows(tokenizer, text, context=16, max_tokens=64)
    kept = decode_faithful_perplexity(model, windows, "fp32", keep_reference=2, progress=False)
    with pytest.raises(TypeError, match="model must be a transformers model .* got .*Tokenizer"):
        decode_faithful_perplexity(tokenizer, windows, "fp32", progress=False)
    with pytest.raises(TypeError, match="pass result.reference"):
        decode_faithful_perplexity(model, windows, "int8", reference=kept, progress=False)
    with pytest.raises(ValueError, match="stepped must be None .*, True or False, got 'yes'"):
        decode_faithful_perplexity(model, windows, "fp32", stepped="yes", progress=False)
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            full_sequence_perplexity(model, windows, batch_size=bad, progress=False)
    foreign = TokenWindows.from_ids(torch.full((2, 16), VOCAB + 5), tokenizer)
    with pytest.raises(EvalInputError, match=f"token id {VOCAB + 5} is outside the model's vocabulary of {VOCAB}"):
        decode_faithful_perplexity(model, foreign, "fp32", progress=False)


def test_reference_options_of_a_sweep():
    """The first config keeps (k clamped to the vocabulary), later ones score; nothing when off or the first failed."""
    from gsq_hf.eval.perplexity import reference_options

    model, kept = tiny_mamba(), object()
    assert reference_options(model, True, None, 8) == {"keep_reference": 8}
    assert reference_options(model, True, None, 10_000) == {"keep_reference": VOCAB}
    assert reference_options(model, False, kept, 8) == {"reference": kept}
    assert reference_options(model, False, None, 8) == {}  # the first run failed: nothing to score against
    assert reference_options(model, True, None, 0) == reference_options(model, False, kept, 0) == {}


# Chunked forwards vs token-by-token stepping (the two evaluation modes). The states are stored after every
# token in both; the scans sum in other orders, so a code on a rounding boundary can flip. Measured on the
# tiny models of every family, 3 windows x 24 tokens, fp32 ... int2, gsq-gate, gsq-budget: ΣNLL within
# 1.2e-6 relative (zamba2, gsq-budget), most under 1e-7.
MODES_RTOL = 1e-5
CHUNKED_CONFIGS = ("fp32", "bf16", "int8", "int4", "int2", "gsq-gate", "gsq-budget")


def check_chunked_equals_stepped(model: torch.nn.Module) -> None:
    from gsq_hf.eval import TokenWindows

    ids = torch.randint(2, 60, (3, 24), generator=torch.Generator().manual_seed(1))
    windows = TokenWindows(ids, torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
    for config in CHUNKED_CONFIGS:
        stepped = decode_faithful_perplexity(model, windows, config, batch_size=2, progress=False, stepped=True)
        chunked = decode_faithful_perplexity(model, windows, config, batch_size=2, progress=False)
        assert (stepped.state.pop("evaluation"), chunked.state.pop("evaluation")) == ("stepped", "chunked")
        assert chunked.nll_sum == pytest.approx(stepped.nll_sum, rel=MODES_RTOL), config
        if chunked.state["policy"] != "static":  # a gate on its threshold may flip with the summation order:
            # format shares and bits within a few unit-writes (measured: equal on these models and this CPU)
            fractions, bits = chunked.state.pop("format_fractions"), chunked.state.pop("avg_state_bits")
            assert fractions == pytest.approx(stepped.state.pop("format_fractions"), abs=1e-3), config
            assert bits == pytest.approx(stepped.state.pop("avg_state_bits"), abs=1e-2), config
        assert chunked.state == stepped.state, config  # the same writes: sizes (and static formats) exactly


def test_chunked_evaluation_equals_stepping(model):
    check_chunked_equals_stepped(model)


def test_chunks_are_bounded_and_entropy_is_stepped(monkeypatch, tokenizer, text):
    model = tiny_mamba()
    windows = make_windows(tokenizer, text, context=24, max_tokens=96)
    whole = decode_faithful_perplexity(model, windows, "int4", batch_size=2, progress=False)
    monkeypatch.setattr("gsq_hf.eval.stepping.CHUNK_LOGITS", 2 * VOCAB * 5)  # chunks of 5 steps
    assert decode_faithful_perplexity(model, windows, "int4", batch_size=2,
                                      progress=False).nll_sum == pytest.approx(whole.nll_sum, rel=MODES_RTOL)
    entropy_on_mamba = {"policy": "static", "format": "int8", "family_overrides": {"mamba": {"policy": "entropy"}}}
    for config in ("gsq-entropy", {"policy": "static", "format": "int8", "write_mode": "end_of_forward"},
                   entropy_on_mamba):  # judged as the config applies to the model
        assert decode_faithful_perplexity(model, windows, config, progress=False).state["evaluation"] == "stepped"
        with pytest.raises(ValueError, match="cannot be evaluated by chunked forwards"):
            decode_faithful_perplexity(model, windows, config, progress=False, stepped=False)


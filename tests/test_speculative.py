import pytest
import torch

import gsq_hf
from gsq_hf import GSQConfigError
from gsq_hf.speculative import speculative_generate


@pytest.mark.parametrize("rollback", ["checkpoints", "recompute", "replay"])
@pytest.mark.parametrize("draft", ["int4", "gsq-gate"])
def test_greedy_equals_plain_generate(model, draft, rollback):
    ids = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)
    out = speculative_generate(model, ids, draft=draft, lookahead=4, max_new_tokens=24, rollback=rollback)
    assert torch.equal(out.sequences, expected)
    assert out.stats.generated == 24 and out.stats.verify_steps >= 24 / 5
    assert not gsq_hf.is_patched(model)  # an unpatched model is patched with fp32 only for the call


def noisy(model, scale: float, seed: int = 0, draft: str = "int4"):
    """A forward hook on the LM head that adds noise to the draft's (config ``draft``) logits: its proposals are
    often wrong."""
    noise = torch.Generator().manual_seed(seed)

    def hook(module, args, output):
        if model._gsq_patch.active_cache.config.name == draft:
            draws = torch.randn(output.shape, generator=noise, device=noise.device).to(output.device)
            return output + scale * output.std() * draws

    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize(("rollback", "draft_sync"), [("checkpoints", "once"), ("recompute", "rejection"),
                                                     ("replay", "once"), ("replay", "every_round")])
def test_batch_rows_commit_their_own_prefix(model, rollback, draft_sync):
    """Batch 4, left-padded prompts of different lengths, a noisy draft: rows accept different numbers of tokens
    each round, and every row's output is still plain greedy ``generate``'s (eos rows padded as it pads them);
    a draft continuing from its own states goes back to each row's own."""
    ids = torch.randint(2, 64, (4, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :6] = mask[3, :1] = 0
    ids[mask == 0] = 0
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    gsq_hf.patch(model, "fp32")
    handle = noisy(model, 1.0)
    try:
        out = speculative_generate(model, ids, attention_mask=mask, draft="int4", lookahead=5, max_new_tokens=20,
                                   rollback=rollback, draft_sync=draft_sync)
    finally:
        handle.remove()
    assert torch.equal(out.sequences, expected)
    assert 0 < out.stats.rollbacks < 4 * out.stats.verify_steps  # some rows rejected, others not, in some rounds


@pytest.mark.parametrize("draft_sync", ["once", "rejection"])
def test_one_token_prompt(model, draft_sync):
    """A prompt of one token (BOS only): no prefill, so a row that rejects every proposal of the first round goes
    back to the empty state (each draft state stored from then on is selected per row against it)."""
    ids = torch.tensor([[5], [9]])
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    gsq_hf.patch(model, "fp32")
    handle = noisy(model, 1.0)
    try:
        out = speculative_generate(model, ids, draft="int4", lookahead=4, max_new_tokens=12, draft_sync=draft_sync)
    finally:
        handle.remove()
    assert torch.equal(out.sequences, expected) and out.stats.rollbacks > 0


@pytest.mark.parametrize("do_sample", [False, True])
def test_every_tensor_is_made_on_the_inputs_device(model, do_sample):
    """No tensor of the loop is made on the default device (on a GPU: on the host, where indexing a CUDA tensor with
    it fails): under a "meta" default device every factory call without a device fails to mix with the CPU ones."""
    ids = torch.randint(2, 64, (4, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    gsq_hf.patch(model, "fp32")
    runs = []
    for default in ("cpu", "meta"):
        handle = noisy(model, 1.0)
        try:
            with torch.device(default):
                runs.append(speculative_generate(model, ids, attention_mask=mask, draft="int4", lookahead=5,
                                                 max_new_tokens=12, do_sample=do_sample,
                                                 generator=torch.Generator(device="cpu").manual_seed(0)))
        finally:
            handle.remove()
    assert torch.equal(runs[0].sequences, runs[1].sequences) and runs[1].stats.rollbacks > 0


def test_partial_acceptance_rolls_back_exactly(model):
    """A draft that is deliberately wrong (sampled) forces rejections; the greedy target output is unchanged."""
    ids = torch.randint(2, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    gsq_hf.patch(model, "int8")  # the target is the int8-state model
    expected = model.generate(ids, max_new_tokens=16, do_sample=False)
    out = speculative_generate(model, ids, draft="int4", lookahead=6, max_new_tokens=16,
                               entropy_threshold=0.0)  # stop after one draft token each round
    assert torch.equal(out.sequences, expected)
    assert out.stats.drafted == out.stats.verify_steps
    for rollback in ("checkpoints", "replay"):
        out = speculative_generate(model, ids, draft="int4", lookahead=6, max_new_tokens=16, rollback=rollback)
        assert torch.equal(out.sequences, expected)
    assert 0 < out.stats.acceptance_rate <= 1 and out.stats.state_bytes_per_token > 0


def test_rejections_happen_and_are_exact(model):
    """Fault injection: the draft's logits get noise (a hook on the LM head), so its proposals are often wrong.

    Every rejection then exercises the rollback; the output must still equal plain greedy decoding.
    """
    ids = torch.randint(2, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, max_new_tokens=30, do_sample=False)
    gsq_hf.patch(model, "fp32")
    handle = noisy(model, 3.0)
    try:
        for rollback in ("checkpoints", "recompute", "replay"):
            for draft_sync in ("once", "rejection", "every_round"):
                out = speculative_generate(model, ids, draft="int4", lookahead=8, max_new_tokens=30, rollback=rollback,
                                           draft_sync=draft_sync)
                assert torch.equal(out.sequences, expected)
                assert out.stats.accepted < out.stats.drafted / 2  # the rollback path ran, often
    finally:
        handle.remove()


@pytest.mark.parametrize("draft_sync", ["once", "rejection", "every_round"])
@pytest.mark.parametrize("rollback", ["checkpoints", "recompute", "replay"])
def test_state_bytes_are_accounted_by_kind(rollback, draft_sync, monkeypatch):
    """The stats' bytes against the caches' own counts: a state read or write is ``memory_report()``'s
    ``state_bytes`` (static formats); a replayed token's kept inputs are its conv input, Δ (fp32) and B per layer
    (x is the conv's output, computed again from the conv inputs of the whole verified forward)."""
    from models import tiny_mamba

    model = tiny_mamba(seed=3)
    ids = torch.randint(2, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    gsq_hf.patch(model, "fp32")
    reports = {}
    for name in ("fp32", "int4"):
        reports[name] = model(ids, cache=gsq_hf.GSQCache(model.config, name)).cache.memory_report()
    target, draft = reports["fp32"]["state_bytes"], reports["int4"]["state_bytes"]
    assert reports["fp32"]["state_bytes_per_step"] == 2 * target and draft < target
    config = model.config
    conv_per_token = config.num_hidden_layers * config.intermediate_size * 4
    kept_per_token = conv_per_token + config.num_hidden_layers * (config.intermediate_size + config.state_size) * 4
    replayed_forwards = []  # tokens recorded by the verify forward of each replay
    replay = gsq_hf.GSQCache.replay

    def counting_replay(cache, num_tokens):
        replayed_forwards.append(cache.gsq_layers[0].step_inputs[0]["conv"].shape[1])
        return replay(cache, num_tokens)

    monkeypatch.setattr(gsq_hf.GSQCache, "replay", counting_replay)
    handle = noisy(model, 2.0)  # forces rejections, so every rollback path runs
    try:
        out = speculative_generate(model, ids, draft="int4", lookahead=4, max_new_tokens=24, rollback=rollback,
                                   draft_sync=draft_sync)
    finally:
        handle.remove()
    s = out.stats
    assert s.rollbacks > 0 and s.accepted > 0
    rounds, syncs = s.verify_steps, s.draft_syncs
    assert {"once": syncs == 1, "every_round": syncs == rounds, "rejection": 1 < syncs <= s.rollbacks + 1}[draft_sync]
    # a sync: the target's state read, the draft's written; a round the draft continues from its own state in
    # "once" writes one more draft state (after the token it absorbs again); a verify: the target read + written
    continued_checkpoints = rounds - syncs if draft_sync == "once" else 0
    assert s.draft_state_bytes == s.draft_steps * 2 * draft + (syncs + continued_checkpoints) * draft
    recommits = 0 if rollback == "checkpoints" else s.rollbacks
    assert s.target_state_bytes == syncs * target + rounds * 2 * target + recommits * 2 * target
    assert s.checkpoint_bytes == (s.drafted * target if rollback == "checkpoints" else 0)
    if rollback == "checkpoints":
        assert s.recommitted_tokens == 0
    else:
        assert s.rollbacks <= s.recommitted_tokens <= s.rollbacks + s.accepted
    replaying = rollback == "replay"  # inputs kept for every verified token; read back: the replayed tokens' own,
    # and the conv inputs of every token of the forward (its conv runs again)
    assert s.replay_write_bytes == (kept_per_token * (s.drafted + rounds) if replaying else 0)
    assert len(replayed_forwards) == (s.rollbacks if replaying else 0)
    expected_reads = (kept_per_token - conv_per_token) * s.recommitted_tokens + conv_per_token * sum(replayed_forwards)
    assert s.replay_read_bytes == (expected_reads if replaying else 0)
    assert s.plain_step_bytes == 2 * target
    assert s.state_bytes_vs_plain == pytest.approx(s.state_bytes_moved / s.generated / (2 * target))


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_sampling_follows_the_target_distribution(batch):
    """Chi-square test of the first two sampled tokens against the target's exact joint distribution, per row.

    4-token vocabulary at temperature 4, 16 cells, 800 seeded runs; the test fails when p < 0.001 (critical
    value 37.7 for 15 degrees of freedom): a correct sampler fails it once in a thousand seeds; the seed is fixed.
    The draft must disagree with the target often enough that rejections and residual resampling happen, in a
    fixed direction (a bias on its logits) so that resampling from the target instead of the residual ``p - q``
    is caught (chi-square 70 and 94 then, against 10 and 9); at batch 2 the rows (different prompts) accept
    different numbers of tokens.
    """
    from models import tiny_mamba

    model = tiny_mamba(seed=0, vocab_size=4)
    ids, temperature = torch.tensor([[2, 3, 1], [3, 0, 2]])[:batch], 4.0  # flat enough that every cell is populated
    gsq_hf.patch(model, "fp32")

    def target(prefix):
        return torch.softmax(model(prefix).logits[0, -1] / temperature, -1)

    def joint(prompt):  # (4, 4): P(first token a, second token b)
        first = target(prompt)
        return torch.stack([first[a] * target(torch.cat([prompt, torch.tensor([[a]])], 1)) for a in range(4)])

    joints = torch.stack([joint(ids[row : row + 1]) for row in range(batch)])
    runs = 800
    assert joints.min() * runs > 5  # the chi-square approximation holds
    counts = torch.zeros(batch, 4, 4)
    drafted = accepted = 0
    generator = torch.Generator().manual_seed(1234)

    def biased_draft(module, args, output):  # a draft distribution far from the target's
        if model._gsq_patch.active_cache.config.name == "draft":
            return output + torch.tensor([3.0, 0.0, 0.0, -3.0])

    handle = model.lm_head.register_forward_hook(biased_draft)
    try:
        for _ in range(runs):
            out = speculative_generate(model, ids, draft={"name": "draft", "policy": "static", "format": "int4"},
                                       lookahead=2, max_new_tokens=2, do_sample=True, temperature=temperature,
                                       generator=generator,
                                       eos_token_id=-1)  # the tiny config calls token 1 eos: never stop here
            drafted, accepted = drafted + out.stats.drafted, accepted + out.stats.accepted
            for row, (a, b) in enumerate(out.sequences[:, -2:].tolist()):
                counts[row, a, b] += 1
    finally:
        handle.remove()
    expected = joints * runs
    chi2 = ((counts - expected) ** 2 / expected.clamp_min(1e-9)).sum(dim=(1, 2))
    assert (chi2 < 37.7).all(), chi2
    assert accepted < 0.8 * drafted
    assert torch.allclose(joints.sum(dim=(1, 2)), torch.ones(batch), rtol=1e-5)


def test_bad_input(model):
    ids = torch.randint(2, 64, (1, 4))
    with pytest.raises(ValueError, match="lookahead must be an integer >= 1"):
        speculative_generate(model, ids, lookahead=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        speculative_generate(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="shape \\(batch, length\\)"):
        speculative_generate(model, torch.randint(2, 64, (4,)))
    with pytest.raises(ValueError, match="last column set \\(left padding\\)"):
        speculative_generate(model, ids, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(GSQConfigError, match="must be lower precision"):
        speculative_generate(model, ids, draft="fp32")
    gsq_hf.patch(model, {"policy": "entropy", "low_format": "int8", "high_format": "fp16"})
    with pytest.raises(GSQConfigError, match="every token"):
        speculative_generate(model, ids, draft="int4")
    gsq_hf.unpatch(model)
    with pytest.raises(ValueError, match="rollback must be one of"):
        speculative_generate(model, ids, rollback="magic")
    with pytest.raises(ValueError, match="draft_sync must be one of once, rejection, every_round"):
        speculative_generate(model, ids, draft_sync="never")
    with pytest.raises(GSQConfigError, match="draft_sync='once' needs a draft that writes its state after every"):
        speculative_generate(model, ids, draft={"name": "d", "format": "int4", "write_mode": "end_of_forward"})
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(gsq_hf.UnsupportedModelError):
        speculative_generate(llama, torch.randint(2, 32, (1, 4)))


@pytest.mark.parametrize("target", [{"name": "int4-sr", "format": "int4", "rounding": "stochastic"}, "gsq-4bit"])
def test_stochastic_rounding_targets_stay_exact_through_rejections(model, target):
    """A target whose own state rounds stochastically (int4-sr) or quasi-randomly (gsq-4bit on Mamba-1) must
    round, after every rollback, as plain decoding does: its greedy output equals plain greedy `generate` of the
    same patched model, with a noisy draft forcing rejections under every rollback."""
    ids = torch.randint(2, 64, (1, 4), generator=torch.Generator().manual_seed(3))
    gsq_hf.patch(model, target)
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)
    handle = noisy(model, 3.0, draft="int2")
    try:
        for rollback in ("checkpoints", "recompute", "replay"):
            out = speculative_generate(model, ids, draft="int2", lookahead=6, max_new_tokens=24, rollback=rollback)
            assert torch.equal(out.sequences, expected), rollback
            assert out.stats.accepted < out.stats.drafted  # rejections happened
    finally:
        handle.remove()

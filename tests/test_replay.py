import pytest
import torch

import gsq_hf
from gsq_hf import GSQCache
from gsq_hf.store import read_state

CONFIGS = {
    "fp32": "fp32",
    "int8, int8 conv": {"name": "int8-conv8", "policy": "static", "format": "int8", "conv_format": "int8"},
    "gsq-gate": "gsq-gate",
    # a rotated format (nearest rounding): on Mamba2 the state is replayed in the rotated basis
    "midrise4-e4m3-hadamard": {"policy": "static", "format": "midrise4-e4m3-hadamard"},
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_replay_stores_the_checkpointed_state_bit_for_bit(model, config):
    """Replaying the first n tokens of a recorded forward stores exactly the state its checkpoint n holds."""
    gsq_hf.patch(model, "fp32")
    ids = torch.randint(2, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    cache = GSQCache(model.config, CONFIGS[config])
    model(ids[:, :5], cache=cache)
    cache.record_positions()
    cache.record_inputs()
    model(ids[:, 5:], cache=cache)
    checkpoints = [list(layer.positions) for layer in cache.gsq_layers]
    assert cache.recorded_input_bytes > 0
    for n in (6, 1, 4):
        cache.replay(n)
        for layer, positions in zip(cache.gsq_layers, checkpoints, strict=True):
            assert torch.equal(layer.read_ssm(), read_state(positions[n - 1]))
            assert torch.equal(layer.storage.conv.dequantize(), positions[n - 1].conv.dequantize())


@pytest.mark.parametrize("config", ["fp32", "gsq-gate"])
def test_each_row_replays_or_rolls_back_to_its_own_count(model, config):
    """Per-row counts (rows of a batch accepting different numbers of tokens): row r gets checkpoint counts[r]."""
    gsq_hf.patch(model, "fp32")
    ids = torch.randint(2, 64, (3, 10), generator=torch.Generator().manual_seed(6))
    counts = torch.tensor([2, 5, 1])
    for method in ("replay", "rollback"):
        cache = GSQCache(model.config, config)
        model(ids[:, :4], cache=cache)
        cache.record_positions()
        cache.record_inputs()
        model(ids[:, 4:], cache=cache)
        checkpoints = [list(layer.positions) for layer in cache.gsq_layers]
        getattr(cache, method)(counts)
        for layer, positions in zip(cache.gsq_layers, checkpoints, strict=True):
            for row, count in enumerate(counts.tolist()):
                assert torch.equal(layer.read_ssm()[row], read_state(positions[count - 1])[row])
                assert torch.equal(layer.read_conv()[row], positions[count - 1].conv.dequantize()[row])


def test_replay_continues_like_a_checkpoint_rollback(model):
    """After a replay to n tokens, decoding goes on exactly as after rolling back to checkpoint n, and as plain
    decoding of those n tokens up to float rounding (a multi-token forward's matmuls round differently)."""
    gsq_hf.patch(model, {"name": "int4-conv8", "policy": "static", "format": "int4", "conv_format": "int8"})
    ids = torch.randint(2, 64, (1, 12), generator=torch.Generator().manual_seed(4))
    plain = model(ids[:, :4]).cache
    for t in range(4, 7):
        plain_logits = model(ids[:, t : t + 1], cache=plain).logits
    logits = {}
    for rollback in ("checkpoints", "replay"):
        cache = model(ids[:, :4]).cache
        cache.record_positions(rollback == "checkpoints")
        cache.record_inputs(rollback == "replay")
        model(ids[:, 4:10], cache=cache)
        cache.rollback(2) if rollback == "checkpoints" else cache.replay(2)
        cache.record_positions(False)
        cache.record_inputs(False)
        logits[rollback] = model(ids[:, 6:7], cache=cache).logits
    assert torch.equal(logits["replay"], logits["checkpoints"])
    assert (logits["replay"] - plain_logits).abs().max() <= 1e-5 * plain_logits.abs().max()


def test_replay_refuses_what_was_not_recorded(model):
    gsq_hf.patch(model, "fp32")
    ids = torch.randint(2, 64, (1, 8))
    cache = model(ids[:, :4]).cache
    with pytest.raises(ValueError, match="can replay 1..0 recorded tokens, not 1"):
        cache.replay(1)
    cache.record_inputs()
    model(ids[:, 4:5], cache=cache)  # a single-token forward is not recorded
    with pytest.raises(ValueError, match="only multi-token forwards are recorded"):
        cache.replay(1)
    cache.record_inputs()
    model(ids[:, 4:7], cache=cache)
    with pytest.raises(ValueError, match="can replay 1..3 recorded tokens, not 4"):
        cache.replay(4)
    end_of_forward = GSQCache(model.config, {"policy": "static", "format": "int8", "write_mode": "end_of_forward"})
    with pytest.raises(ValueError, match="replay needs write_mode='every_step'"):
        end_of_forward.record_inputs()


def test_replay_keeps_no_copy_of_the_conv_output(model, family):
    """x (and B on Mamba2) are views of the conv's output, which a replay computes again: per token and layer the
    record holds the conv input, Δ and (Mamba-1) B, and replay still stores checkpoint n bit for bit."""
    gsq_hf.patch(model, "fp32")
    ids = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(8))
    cache = model(ids[:, :4]).cache
    cache.record_positions()
    cache.record_inputs()
    model(ids[:, 4:], cache=cache)
    config, layer = model.config, cache.gsq_layers[0]
    conv_dim = layer.conv_shape[1]
    if family == "mamba":
        values = 2 * conv_dim + config.state_size  # conv input, Δ (per channel), B
    else:
        values = conv_dim + config.num_heads  # conv input, Δ (per head)
    assert cache.recorded_input_bytes == len(cache.gsq_layers) * 2 * 5 * values * 4
    assert sorted(name for name, value in layer.step_inputs[0].items() if torch.is_tensor(value) and name != "A") == (
        ["B", "conv", "dt"] if family == "mamba" else ["conv", "dt"])
    checkpoint = layer.positions[2]
    cache.replay(3)
    assert torch.equal(layer.read_ssm(), read_state(checkpoint))

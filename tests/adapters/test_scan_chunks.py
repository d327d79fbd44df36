import pytest
import torch
from models import FAMILIES

import gsq_hf
from gsq_hf.adapters import base


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("config", [
    "fp32", {"format": "int4", "rounding": "stochastic"}, "gsq-gate", "gsq-4bit",
    {"format": "midrise4-e4m3up-hadamard", "rounding": "stochastic", "scale_hold": 0.7}])
def test_a_forward_in_scan_chunks_is_the_forward_in_one_piece(family, config, monkeypatch):
    """every_step forwards discretize and scan their tokens in chunks of SCAN_CHUNK: the logits, the stored state
    and the write statistics equal those of one piece, bit for bit (stochastic rounding draws included)."""
    model = FAMILIES[family]().eval()
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(0))
    runs = []
    for chunk in (5, 1000):
        monkeypatch.setattr(base, "SCAN_CHUNK", chunk)
        with torch.no_grad(), gsq_hf.patched(model, config):
            cache = gsq_hf.GSQCache(model, config)
            logits = model(ids, cache=cache).logits
            runs.append((logits, [layer.read_ssm() for layer in cache.gsq_layers], cache.memory_report()))
    (logits, states, report), (logits_whole, states_whole, report_whole) = runs
    assert torch.equal(logits, logits_whole)
    assert all(torch.equal(a, b) for a, b in zip(states, states_whole, strict=True))
    assert report["avg_state_bits"] == report_whole["avg_state_bits"]
    assert report["format_fractions"] == report_whole["format_fractions"]

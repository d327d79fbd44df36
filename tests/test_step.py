"""`gsq_hf.step`: why a decode step does not take the fused kernel is a value the caller reads, logged once."""

from __future__ import annotations

import logging

import pytest
import torch

import gsq_hf
from gsq_hf.step import discretize, kernel_reason, unit_gate


def decode_once(model, config):
    """A prefill and one decode step of ``model`` with ``config``; the cache."""
    with gsq_hf.patched(model, config):
        ids = torch.randint(2, 64, (2, 4), generator=torch.Generator().manual_seed(0))
        cache = model(ids).cache
        model(ids[:, :1], cache=cache)
    return cache


@pytest.mark.parametrize("config, reason", [
    ({"policy": "static", "format": "int8", "kernel": "torch"}, "GSQConfig.kernel='torch'"),
    ({"policy": "static", "format": "int8"}, "tensors not on CUDA (kernel='auto' runs the kernel on CUDA only)"),
])
def test_reason_is_read_from_the_layer(model, config, reason):
    cache = decode_once(model, config)
    assert {layer.kernel_reason for layer in cache.gsq_layers} == {reason}
    assert {layer.conv_reason for layer in cache.gsq_layers} == {reason}  # the conv's: the same mode rules
    assert kernel_reason(cache.gsq_layers[0], torch.zeros(1), torch.zeros(1), None) == reason


def test_what_the_kernel_cannot_do_is_named(model):
    """With the kernel forced (on a CPU under Triton's interpreter), the reasons left are the kernel's own."""
    pytest.importorskip("triton", exc_type=ImportError)
    cache = decode_once(model, {"policy": "budget", "low_format": "int4", "high_format": "fp16", "kernel": "triton"})
    assert cache.gsq_layers[0].kernel_reason == "GateBudgetPolicy has no kernel rule: the kernel decides static, " \
                                                "gate-threshold and row policies"
    cache = decode_once(model, {"policy": "static", "format": "midrise3-e4m3-hadamard", "kernel": "triton"})
    assert cache.gsq_layers[0].kernel_reason is None  # every composed format is the kernel's own


def test_reason_logged_once_per_cache(model, caplog):
    with caplog.at_level(logging.INFO, logger="gsq_hf.step"):
        decode_once(model, "int8")
    lines = [r.getMessage() for r in caplog.records if r.name == "gsq_hf.step"]
    reason = "tensors not on CUDA (kernel='auto' runs the kernel on CUDA only)"
    assert lines == [f"gsq_hf: decode steps' convs take the torch path: {reason}",
                     f"gsq_hf: decode steps take the torch path: {reason}"]  # two layers, one step each: once each


@pytest.mark.parametrize("layout", ["mamba", "zamba", "mamba2"])
def test_gate_is_one_minus_the_mean_decay_of_a_unit(layout):
    g = torch.Generator().manual_seed(0)
    batch, heads, p, n = 2, 3, 4, 8
    if layout == "mamba":  # units = channels, A per (channel, n)
        x, dt, A = torch.randn(batch, heads, generator=g), torch.rand(batch, heads, generator=g), -torch.rand(heads, n)
        B = C = torch.randn(batch, n, generator=g)
    elif layout == "zamba":  # units = heads, A per (head, p, n)
        x, dt = torch.randn(batch, heads, p, generator=g), torch.rand(batch, heads, p, generator=g)
        A, B = -torch.rand(heads, p, n, generator=g), torch.randn(batch, heads, n, generator=g)
        C = B
    else:  # units = heads, one decay per head
        x, dt, A = torch.randn(batch, heads, p, generator=g), torch.rand(batch, heads, generator=g), -torch.rand(heads)
        B = C = torch.randn(batch, 1, n, generator=g)
    dA, dBx, _ = discretize(x, dt, A, B, C)
    gate = unit_gate(dA, A)
    assert gate.shape == (batch, heads) and dBx.shape[:2] == (batch, heads)
    decay = torch.exp(dt[..., None] * A) if A.dim() > 1 else torch.exp(dt * A)
    expected = 1 - (decay.flatten(2).mean(-1) if A.dim() > 1 else decay)
    torch.testing.assert_close(gate, expected, rtol=0, atol=1e-7)

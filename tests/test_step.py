"""`gsq_hf.step`: why a decode step does not take the fused kernel is a value the caller reads, logged once; a
Mamba2 state with a rotated low format is updated in the rotated basis, storing what rotating around would."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from models import tiny_mamba2

import gsq_hf
import gsq_hf.adapters.base as adapter_base
import gsq_hf.replay as replay_module
import gsq_hf.step as step_module
from gsq_hf.formats import _hadamard
from gsq_hf.step import discretize, kernel_reason, rotated_basis, ssm_step, unit_gate


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
    cache = decode_once(model, {"policy": "static", "format": "int4", "scale_hold": 0.7, "kernel": "triton"})
    assert cache.gsq_layers[0].kernel_reason is None  # held scales too


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


# -- a Mamba2 state kept in the rotated basis ----------------------------------------------------------------
_spec = importlib.util.spec_from_file_location("families", Path(__file__).parent / "adapters" / "test_families.py")
families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(families)

ROTATED_MODELS = {"mamba2": tiny_mamba2, "bamba": lambda: families.build("bamba"),
                  "zamba2": lambda: families.build("zamba2")}
ROTATED_CONFIGS = {
    "gsq-4bit": "gsq-4bit",  # midrise4-e4m3-hadamard on the Mamba2 families
    "gsq-3bit": "gsq-3bit",
    "gate, rotated low, unrotated high": {"policy": "gate", "low_format": "midrise4-e4m3-hadamard",
                                          "high_format": "int8", "threshold": 0.3, "high_when": "open"},
    "budget, rotated low": {"policy": "budget", "low_format": "midrise4-e4m3-hadamard", "high_format": "fp16",
                            "budget_fraction": 0.25},
}
# max |Δlogit| / max |logit| of the rotated-basis step vs the rotate-around one: float rounding (measured: at
# most 6e-6, on zamba2; no stored code differs on these models). B and C rotated by Mᵀ instead of M move the
# logits by 8e-4 to 0.12 of max |logit| (`test_the_comparison_catches_B_and_C_rotated_by_the_transpose`).
ROTATED_RTOL = 2e-5


def _rotate_around(monkeypatch) -> None:
    """The torch path before the rotated basis: unrotate every read state, rotate every written one."""
    for module in (step_module, adapter_base, replay_module):
        monkeypatch.setattr(module, "rotated_basis", lambda policy, A: False)


def _prefill_steps_chunk(model, config):
    """Logits of a 6-token prefill, 4 decode steps and a 4-token forward on the cache; the layers' unrotated
    states and stored low copies after them."""
    ids = torch.randint(2, 64, (2, 14), generator=torch.Generator().manual_seed(0))
    with gsq_hf.patched(model, config):
        out = model(ids[:, :6])
        logits, cache = [out.logits], out.cache
        for t in range(6, 10):
            out = model(ids[:, t:t + 1], cache=cache, position_ids=torch.tensor([[t]]))  # bamba: explicit positions
            logits.append(out.logits)
        logits.append(model(ids[:, 10:], cache=cache, position_ids=torch.arange(10, 14)[None]).logits)
    return torch.cat(logits, dim=1), [layer.read_ssm() for layer in cache.gsq_layers], \
        [layer.storage.low for layer in cache.gsq_layers]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_rotated_basis_is_mamba2_with_a_rotated_low_format():
    from gsq_hf.config import resolve_config

    rotated, plain = resolve_config("gsq-4bit").build_policy(), resolve_config("int4").build_policy()
    assert rotated_basis(rotated, -torch.rand(4)) and not rotated_basis(plain, -torch.rand(4))
    assert not rotated_basis(rotated, -torch.rand(4, 8))  # Mamba-1: a decay per state dimension
    with pytest.raises(ValueError, match="does not commute"):
        discretize(torch.randn(2, 4), torch.rand(2, 4), -torch.rand(4, 8), torch.randn(2, 8), torch.randn(2, 8), True)


def test_a_step_in_the_rotated_basis_is_the_step_rotated():
    """From ``h @ M`` with B and C rotated, the step gives ``h' @ M`` and the same y (M, not Mᵀ: M = diag(signs)
    · H / √N is not symmetric)."""
    g = torch.Generator().manual_seed(0)
    batch, heads, p, n = 2, 4, 6, 16
    x, dt, A = torch.randn(batch, heads, p, generator=g), torch.rand(batch, heads, generator=g), -torch.rand(heads)
    B, C, D = torch.randn(batch, 2, n, generator=g), torch.randn(batch, 2, n, generator=g), torch.randn(heads)
    h = torch.randn(batch, heads, p, n, generator=g)
    m = _hadamard(n, h.device)
    y, h_new, _ = ssm_step(h, x, dt, A, B, C, D, None, False)
    y_rot, h_rot, _ = ssm_step(h @ m, x, dt, A, B, C, D, None, False, rotated=True)
    torch.testing.assert_close(h_rot, h_new @ m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_rot, y, rtol=1e-5, atol=1e-5)
    assert (h_rot - h_new @ m.T).abs().max() > 0.1


@pytest.mark.parametrize("config", sorted(ROTATED_CONFIGS))
@pytest.mark.parametrize("name", sorted(ROTATED_MODELS))
def test_rotated_basis_stores_what_rotating_around_stores(name, config, monkeypatch):
    """Prefill (the chunked scan), decode steps and a multi-token forward from a stored state: the logits, the
    unrotated states readers see and the stored codes equal the rotate-around path's up to float rounding."""
    logits, states, stored = _prefill_steps_chunk(ROTATED_MODELS[name](), ROTATED_CONFIGS[config])
    _rotate_around(monkeypatch)
    ref_logits, ref_states, ref_stored = _prefill_steps_chunk(ROTATED_MODELS[name](), ROTATED_CONFIGS[config])
    assert _relative(logits, ref_logits) <= ROTATED_RTOL
    for state, ref_state, low, ref_low in zip(states, ref_states, stored, ref_stored, strict=True):
        # a value on a rounding tie (here: of an fp16 high copy) may round the other way: a few, by one step
        assert ((state - ref_state).abs() > ROTATED_RTOL * ref_state.abs().max()).float().mean() <= 0.01
        assert low.fmt == ref_low.fmt and (low.data != ref_low.data).float().mean() <= 0.01


def test_the_comparison_catches_B_and_C_rotated_by_the_transpose(monkeypatch):
    """The bound above fails by far when B and C are rotated by Mᵀ (the wrong side of the product)."""
    reference = {name: _prefill_steps_chunk(build(), "gsq-4bit")[0] for name, build in ROTATED_MODELS.items()}
    monkeypatch.setattr(step_module, "rotate_rows", lambda x: x.float() @ _hadamard(x.shape[-1], x.device).T)
    for name, build in ROTATED_MODELS.items():
        assert _relative(_prefill_steps_chunk(build(), "gsq-4bit")[0], reference[name]) > 20 * ROTATED_RTOL


@pytest.mark.parametrize("name", sorted(ROTATED_MODELS))
def test_fp32_codes_rotated_are_the_unrotated_state(name):
    """fp32-hadamard, kept in the rotated basis, is fp32 up to float rounding (the rotation loses nothing)."""
    rotated = _prefill_steps_chunk(ROTATED_MODELS[name](), {"policy": "static", "format": "fp32-hadamard"})
    plain = _prefill_steps_chunk(ROTATED_MODELS[name](), "fp32")
    assert _relative(rotated[0], plain[0]) <= 1e-5
    assert all(_relative(a, b) <= 1e-5 for a, b in zip(rotated[1], plain[1], strict=True))

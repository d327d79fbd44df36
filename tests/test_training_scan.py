"""scripts/training_scan.py: the hand-written backward is the true gradient, and the scan is transformers' scan."""

from __future__ import annotations

import json

import pytest
import torch
from script_loader import load_script
from transformers import MambaConfig, MambaForCausalLM
from transformers.models.mamba import modeling_mamba


@pytest.fixture(scope="module")
def scan():
    return load_script("training_scan")


def scan_inputs(dtype, b=2, d=5, length=7, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, length, generator=gen, dtype=dtype)
    dt = torch.randn(b, d, length, generator=gen, dtype=dtype)
    A = -torch.rand(d, n, generator=gen, dtype=dtype) * 2  # noqa: N806
    B, C = (torch.randn(b, n, length, generator=gen, dtype=dtype) for _ in range(2))  # noqa: N806
    return [t.requires_grad_() for t in (x, dt, A, B, C)]


def test_backward_is_the_gradient_in_float64(scan):
    x, dt, A, B, C = scan_inputs(torch.float64)  # noqa: N806
    with torch.enable_grad():
        assert torch.autograd.gradcheck(lambda x, dt, *rest: scan.SequentialSelectiveScan.apply(
            x, torch.nn.functional.softplus(dt), *rest), (x, dt, A, B, C))


def test_matches_transformers_scan_and_its_gradients(scan):
    """Forward and every input gradient against `modeling_mamba.mamba_selective_scan` (torch path), in fp32."""
    inputs = scan_inputs(torch.float32, b=3, d=6, length=11, n=4, seed=1)
    gen = torch.Generator().manual_seed(2)
    D, z, bias = torch.randn(6, generator=gen), torch.randn(3, 6, 11, generator=gen), torch.randn(6, generator=gen)  # noqa: N806
    results = []
    for fn in (modeling_mamba.mamba_selective_scan, scan.selective_scan):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with torch.enable_grad():
            y = fn(*leaves, D=D, z=z, delta_bias=bias, delta_softplus=True)
            y.square().sum().backward()
        results.append((y.detach(), [t.grad for t in leaves]))
    (y_ref, grads_ref), (y, grads) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip("x dt A B C".split(), grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


def test_context_swaps_the_mamba_training_scan_and_restores_it(scan):
    """A tiny MambaForCausalLM in training mode: same loss and gradients inside the block; restored after."""
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, state_size=4,
                                         expand=2, use_mambapy=False)).train()
    ids = torch.randint(0, 32, (2, 9))
    original = modeling_mamba.mamba_selective_scan

    def loss_and_grads():
        model.zero_grad()
        with torch.enable_grad():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = loss_and_grads()
    with scan.sequential_mamba_scan():
        assert modeling_mamba.mamba_selective_scan is not original
        loss, grads = loss_and_grads()
    assert modeling_mamba.mamba_selective_scan is original
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-5)


def test_scan_choice_and_the_timing_script(scan, tmp_path):
    """auto: sequential on CPU, mambapy on a GPU, Mamba2's own path; the benchmark times both scans to JSON."""
    assert scan.resolve_scan("mamba", "auto", "cpu") == "sequential"
    assert scan.resolve_scan("mamba", "auto", "cuda") == "mambapy"
    assert scan.resolve_scan("mamba", "mambapy", "cpu") == "mambapy"
    assert scan.resolve_scan("mamba2", "sequential", "cpu") == "transformers-chunked"
    with torch.enable_grad():
        result = scan.main(["--hidden", "8", "--d-state", "4", "--batch", "2", "--length", "5", "--steps", "1",
                            "--json", str(tmp_path / "scan.json")])
    saved = json.loads((tmp_path / "scan.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [r["scan"] for r in saved["results"]] == ["sequential", "mambapy"]
    assert all(r["ms_per_step"] > 0 for r in saved["results"]) and saved["results"][0]["vs_sequential"] == 1.0

"""The adapters' decode steps dispatch to the fused Triton kernel (here through Triton's interpreter on CPU).

``GSQConfig.kernel='triton'`` forces the kernel on CPU tensors so that the dispatch itself is tested in
CI; on a GPU machine the same tests run on CUDA tensors, where ``auto`` takes the same path. The kernel
and the torch path must agree in kind: the same stored formats, the same policy decisions, logits within
rounding (the kernel rounds with a reciprocal scale and sums in another order; see
`gsq_hf.kernels.state_update`).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernel needs triton: pip install 'gsq_hf[triton]'",
                    exc_type=ImportError)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device: run with TRITON_INTERPRET=1 to test the kernel dispatch on CPU",
                allow_module_level=True)

import gsq_hf  # noqa: E402
import gsq_hf.kernels.state_update as kernel_module  # noqa: E402
from gsq_hf import GSQCache, GSQConfig  # noqa: E402
from gsq_hf.errors import GSQConfigError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPT = torch.tensor([[5, 9, 3, 17, 2, 8], [4, 4, 11, 30, 7, 1]], device=DEVICE)
CONFIGS = {
    "fp32": dict(policy="static", format="fp32"),
    "int8": dict(policy="static", format="int8"),
    "int4": dict(policy="static", format="int4"),
    "gate-open": dict(policy="gate", low_format="int8", high_format="fp16", threshold=0.3, high_when="open"),
    "gate-closed": dict(policy="gate", low_format="int4", high_format="int8", threshold=0.3, high_when="closed"),
    "entropy": dict(policy="entropy", low_format="int4", high_format="fp16", threshold=0.9),
    "gsq-4bit": dict(policy="static", format="midrise4-e4m3-hadamard"),  # the presets' formats, nearest rounding
    "gsq-3bit": dict(policy="static", format="midrise3-e4m3-hadamard"),
    "int4-hold": dict(policy="static", format="int4", scale_hold=0.7),  # held scales (GSQConfig.scale_hold)
    "gsq-4bit-hold": dict(policy="static", format="midrise4-e4m3up-hadamard", scale_hold=0.5),
}
# |kernel - torch| of the logits, relative to their scale: fp32 differs by summation order only; a quantized
# state can move one code at a rounding tie (the reciprocal scale), i.e. about one quantization step.
TOLERANCE = {"fp32": 1e-5, "int8": 2e-3, "int4": 2e-2, "gate-open": 2e-3, "gate-closed": 2e-2, "entropy": 2e-2,
             "gsq-4bit": 2e-2, "gsq-3bit": 4e-2, "int4-hold": 2e-2, "gsq-4bit-hold": 2e-2}


@pytest.fixture
def model(model):
    return model.to(DEVICE)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The fused kernel's calls, by their keyword arguments (the adapters import it at call time)."""
    calls = []
    original = kernel_module.state_update

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "state_update", spy)
    return calls


def decode(model, config: dict, steps: int = 4):
    """Prefill, then ``steps`` single-token forwards; the logits of every step and the cache."""
    cache = GSQCache(model, GSQConfig(**config))
    logits = [model(PROMPT, cache=cache).logits[:, -1]]
    token = logits[-1].argmax(-1, keepdim=True)
    for _ in range(steps):
        logits.append(model(token, cache=cache).logits[:, -1])
        token = logits[-1].argmax(-1, keepdim=True)
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernel_decode_matches_torch_path(model, name, kernel_calls):
    gsq_hf.patch(model)
    with torch.no_grad():
        torch_logits, torch_cache = decode(model, CONFIGS[name] | {"kernel": "torch"})
        assert not kernel_calls
        kernel_logits, kernel_cache = decode(model, CONFIGS[name] | {"kernel": "triton"})
    layers = len(kernel_cache.gsq_layers)
    assert len(kernel_calls) == 4 * layers  # every decode step of every layer; the prefill stays on torch
    assert {call["scale_hold"] for call in kernel_calls} == {CONFIGS[name].get("scale_hold", 0.0)}
    scale = torch_logits.abs().max()
    assert (kernel_logits - torch_logits).abs().max() <= TOLERANCE[name] * scale
    for ours, theirs in zip(kernel_cache.gsq_layers, torch_cache.gsq_layers, strict=True):
        assert ours.storage.low.fmt == theirs.storage.low.fmt
        assert ours.writes == theirs.writes == PROMPT.shape[1] + 4  # every_step: one write per token
        if theirs.storage.high_valid is None:
            assert ours.storage.high_valid is None
        else:  # the same policy decisions (gate or entropy signal, up to ties at the threshold)
            agree = (ours.storage.high_valid == theirs.storage.high_valid).float().mean()
            assert agree >= 0.95
        assert torch.allclose(ours.read_ssm(), theirs.read_ssm(), rtol=0, atol=TOLERANCE[name] * 10 *
                              theirs.read_ssm().abs().max())
    ours, theirs = kernel_cache.memory_report(), torch_cache.memory_report()
    assert ours["avg_state_bits"] == pytest.approx(theirs["avg_state_bits"], rel=0.05)


def test_lossless_kernel_decode_matches_unpatched_model(model):
    """fp32 through the kernel vs the unpatched model: only float summation order differs."""
    with torch.no_grad():
        reference = model.generate(PROMPT, max_new_tokens=5, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True)
        gsq_hf.patch(model, {"policy": "static", "format": "fp32", "kernel": "triton"})
        ours = model.generate(PROMPT, max_new_tokens=5, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)
    assert torch.equal(ours.sequences, reference.sequences)
    for a, b in zip(ours.scores, reference.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_budget_policy_and_auto_on_cpu_take_the_torch_path(model, kernel_calls):
    gsq_hf.patch(model)
    with torch.no_grad():
        decode(model, dict(policy="budget", low_format="int4", high_format="fp16", kernel="triton"), steps=2)
        assert not kernel_calls
        decode(model, dict(policy="static", format="int8", kernel="auto"), steps=2)
    assert len(kernel_calls) == (2 * 2 if DEVICE == "cuda" else 0)  # auto: the kernel on CUDA tensors only


def test_nonfinite_step_is_redone_on_the_torch_path(model, monkeypatch):
    """A NaN output from the kernel discards its step; the torch path then keeps the bad units in fp32."""
    original = kernel_module.state_update

    def poisoned(*args, **kwargs):
        update = original(*args, **kwargs)
        return update._replace(y=torch.full_like(update.y, float("nan")))

    monkeypatch.setattr(kernel_module, "state_update", poisoned)
    gsq_hf.patch(model)
    with torch.no_grad():
        fused, _ = decode(model, dict(policy="static", format="int8", kernel="triton"), steps=2)
        reference, _ = decode(model, dict(policy="static", format="int8", kernel="torch"), steps=2)
    torch.testing.assert_close(fused, reference)


def test_forced_kernel_on_cpu_without_the_interpreter_is_a_clear_error(model, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = model.cpu()
    gsq_hf.patch(model, {"policy": "static", "format": "int8", "kernel": "triton"})
    with torch.no_grad(), pytest.raises(GSQConfigError, match="TRITON_INTERPRET=1"):
        model.generate(PROMPT.cpu(), max_new_tokens=2, do_sample=False)

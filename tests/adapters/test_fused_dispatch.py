"""The adapters' decode steps dispatch to the fused Triton kernel (here through Triton's interpreter on CPU).

``GSQConfig.kernel='triton'`` forces the kernel on CPU tensors so that the dispatch itself is tested in
CI; on a GPU machine the same tests run on CUDA tensors, where ``auto`` takes the same path. The kernel
and the torch path must agree in kind: the same stored formats, the same policy decisions, logits within
rounding (the kernel rounds with a reciprocal scale and sums in another order; see
`gsq_hf.kernels.state_update`). The conv before the step runs in Triton too: its own launch on Mamba-1
(`gsq_hf.kernels.conv_step`), inside the state update's launch on Mamba2.
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
import gsq_hf.kernels.conv_step as conv_module  # noqa: E402
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


def test_layer_overrides_reach_the_kernel(model, kernel_calls):
    """A layer's own format (`GSQConfig.layer_overrides`) is what the kernel stores there, as the torch path does."""
    gsq_hf.patch(model)
    probe = GSQCache(model, "fp32")
    last = max(index for index, layer in enumerate(probe.layers) if layer in probe.gsq_layers)
    config = dict(policy="static", format="int4", layer_overrides={last: {"format": "midrise4-e4m3-hadamard"}})
    with torch.no_grad():
        torch_logits, torch_cache = decode(model, config | {"kernel": "torch"})
        kernel_logits, kernel_cache = decode(model, config | {"kernel": "triton"})
    expected = {"midrise4-e4m3-hadamard"} | ({"int4"} if len(probe.gsq_layers) > 1 else set())
    assert {call["policy"].low.name for call in kernel_calls} == expected
    assert kernel_cache.layers[last].storage.low.fmt.name == "midrise4-e4m3-hadamard"
    for ours, theirs in zip(kernel_cache.gsq_layers, torch_cache.gsq_layers, strict=True):
        assert ours.storage.low.fmt == theirs.storage.low.fmt
    assert (kernel_logits - torch_logits).abs().max() <= 2e-2 * torch_logits.abs().max()


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


@pytest.fixture
def launches(monkeypatch):
    """The Triton launches of decode steps: "conv" (the conv alone), "state" and "state+conv" (Mamba2's fused)."""
    calls = []
    state_update, conv_step = kernel_module.state_update, conv_module.conv_step

    def state_spy(*args, **kwargs):
        calls.append("state+conv" if kwargs.get("conv") is not None else "state")
        return state_update(*args, **kwargs)

    def conv_spy(*args, **kwargs):
        calls.append("conv")
        return conv_step(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "state_update", state_spy)
    monkeypatch.setattr(conv_module, "conv_step", conv_spy)
    return calls


CONV_CONFIGS = {  # state and conv window formats
    "fp32": dict(policy="static", format="fp32"),
    "int8/conv-int8": dict(policy="static", format="int8", conv_format="int8"),
    "gsq-4bit/conv-int4": dict(policy="static", format="midrise4-e4m3-hadamard", conv_format="int4"),
}


@pytest.mark.parametrize("name", sorted(CONV_CONFIGS))
def test_conv_in_triton_gives_the_torch_paths_tokens(model, family, name, launches):
    """Mamba-1: a conv launch, then the state update, per layer and step; Mamba2: one launch for both. The same
    greedy tokens; logits within the state kernel's tolerance (the conv adds float rounding only); the first
    layer's window (its inputs do not depend on any conv output) as the torch path stores it, bit for bit, int4
    window included; the later layers' within the logits' tolerance of the window's scale."""
    steps = 3
    gsq_hf.patch(model)
    config = CONV_CONFIGS[name]
    with torch.no_grad():
        torch_logits, torch_cache = decode(model, config | {"kernel": "torch"}, steps=steps)
        assert not launches
        kernel_logits, kernel_cache = decode(model, config | {"kernel": "triton"}, steps=steps)
    layers = len(kernel_cache.gsq_layers)
    per_step = ["conv", "state"] if family == "mamba" else ["state+conv"]
    assert launches == per_step * (steps * layers)
    assert all(layer.conv_reason is None and layer.kernel_reason is None for layer in kernel_cache.gsq_layers)
    assert torch.equal(kernel_logits.argmax(-1), torch_logits.argmax(-1))
    tolerance = TOLERANCE[{"fp32": "fp32", "int8/conv-int8": "int8", "gsq-4bit/conv-int4": "gsq-4bit"}[name]]
    assert (kernel_logits - torch_logits).abs().max() <= tolerance * torch_logits.abs().max()
    ours, theirs = kernel_cache.gsq_layers[0].storage.conv, torch_cache.gsq_layers[0].storage.conv
    assert ours.fmt == theirs.fmt and torch.equal(ours.data, theirs.data)
    assert ours.scale is None or torch.equal(ours.scale, theirs.scale)
    for mine, other in zip(kernel_cache.gsq_layers[1:], torch_cache.gsq_layers[1:], strict=True):
        step = other.storage.conv.scale.max() if other.storage.conv.scale is not None else 0.0  # one code at a tie
        torch.testing.assert_close(mine.read_conv(), other.read_conv(), rtol=0,
                                   atol=tolerance * other.read_conv().abs().max() + step)


def test_conv_runs_in_triton_when_the_state_update_cannot(model, family, launches):
    """A budget policy keeps the state update on torch; the conv still takes its own launch (Mamba2 too)."""
    gsq_hf.patch(model)
    config = dict(policy="budget", low_format="int4", high_format="fp16")
    with torch.no_grad():
        torch_logits, _ = decode(model, config | {"kernel": "torch"}, steps=2)
        kernel_logits, cache = decode(model, config | {"kernel": "triton"}, steps=2)
    assert launches == ["conv"] * (2 * len(cache.gsq_layers))
    assert {layer.kernel_reason.split(":")[0] for layer in cache.gsq_layers} == {"GateBudgetPolicy has no kernel rule"}
    torch.testing.assert_close(kernel_logits, torch_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, reason", [
    (dict(policy="static", format="int8", conv_format="int4-e4m3"), "conv format int4-e4m3: the conv kernel"),
    (dict(policy="static", format="int8", conv_format="int8", rounding="stochastic"),
     "stochastic rounding of a lossy conv window (int8)"),
])
def test_what_the_conv_kernel_does_not_cover_takes_the_torch_conv(model, config, reason, launches):
    """Named in ``layer.conv_reason``; the state update still takes its kernel (Mamba2: without the conv)."""
    gsq_hf.patch(model)
    with torch.no_grad():
        _, cache = decode(model, config | {"kernel": "triton"}, steps=1)
    assert {layer.conv_reason.split(" draws")[0].split(" stores")[0] for layer in cache.gsq_layers} == {reason}
    assert launches == ["state"] * len(cache.gsq_layers)


def test_a_conv_activation_other_than_silu_takes_the_torch_conv(family, launches):
    from models import FAMILIES

    model = gsq_hf.patch(FAMILIES[family](hidden_act="gelu").to(DEVICE))
    with torch.no_grad():
        _, cache = decode(model, dict(policy="static", format="int8", kernel="triton"), steps=1)
    assert {layer.conv_reason for layer in cache.gsq_layers} == {"conv activation 'gelu': the conv kernel applies SiLU"}
    assert launches == ["state"] * len(cache.gsq_layers)


def test_a_padding_mask_keeps_mamba2s_conv_out_of_the_state_launch(launches):
    """The mask applies between the conv and the step, so a masked single-token forward (transformers passes none
    at decode; a caller may) launches the conv, masks, then the state update; all-ones: the unmasked output."""
    from models import tiny_mamba2

    from gsq_hf.adapters.mamba2 import Mamba2Adapter

    model = gsq_hf.patch(tiny_mamba2().to(DEVICE))
    mixer = model.backbone.layers[0].mixer
    hidden = torch.randn(2, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    outputs = []
    with torch.no_grad():
        for mask in (None, torch.ones(2, 1, device=DEVICE)):
            cache = GSQCache(model, GSQConfig(policy="static", format="int8", kernel="triton"))
            model(PROMPT, cache=cache)
            launches.clear()
            outputs.append(Mamba2Adapter().forward(mixer, hidden, cache.gsq_layer(0), mask))
            assert launches == (["state+conv"] if mask is None else ["conv", "state"])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_checkpoints_of_decode_steps_hold_the_kernels_window(model, launches):
    """While the cache records positions, a decode step's checkpoint holds the window its conv launch (or, on
    Mamba2, its fused launch) stored; a rollback to it restores the torch path's window and state."""
    gsq_hf.patch(model)
    caches, checkpoints = {}, {}
    with torch.no_grad():
        for kernel in ("torch", "triton"):
            cache = GSQCache(model, GSQConfig(policy="static", format="fp32", kernel=kernel))
            model(PROMPT, cache=cache)
            cache.record_positions()
            token = PROMPT[:, -1:]
            for _ in range(2):
                token = model(token, cache=cache).logits[:, -1:].argmax(-1)
            checkpoints[kernel] = [len(layer.positions) for layer in cache.gsq_layers]
            cache.rollback(1)
            caches[kernel] = cache
    assert launches and checkpoints["triton"] == checkpoints["torch"] == [2] * len(cache.gsq_layers)
    for ours, theirs in zip(caches["triton"].gsq_layers, caches["torch"].gsq_layers, strict=True):
        torch.testing.assert_close(ours.read_conv(), theirs.read_conv(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.read_ssm(), theirs.read_ssm(), rtol=1e-5, atol=1e-5)
    first = caches["triton"].gsq_layers[0]
    assert torch.equal(first.read_conv(), caches["torch"].gsq_layers[0].read_conv())  # its inputs: the same tokens

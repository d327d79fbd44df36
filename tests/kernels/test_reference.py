"""The kernel's torch twin is what CPU users run: bit for bit, every family and every kind of stored state.

Each decode step a patched model takes on the torch path (`gsq_hf.step.decode_step`) is replayed through
`state_update_reference` from the storage the layer held before it, with the same inputs and the same draws
of stochastic rounding (quasi-random: the same thresholds): the output, the stored copies (low, high, budget
slots, fp32 fallback units) and the gate must be equal, not close. Needs no triton (the kernel itself:
``test_state_update.py``).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from models import tiny_mamba, tiny_mamba2

import gsq_hf
import gsq_hf.adapters.mamba as mamba_adapter
import gsq_hf.step as step_module
from gsq_hf.kernels import state_update_reference

_spec = importlib.util.spec_from_file_location("families", Path(__file__).parents[1] / "adapters" / "test_families.py")
families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(families)

MODELS = {"mamba": tiny_mamba, "mamba2": tiny_mamba2, "zamba": lambda: families.build("zamba"),
          "bamba": lambda: families.build("bamba"), "falcon_h1": lambda: families.build("falcon_h1")}
CONFIGS = {
    "int8": "int8",
    "int3": "int3",  # a format only the torch path stores
    "gsq-4bit": "gsq-4bit",  # log8 scales, Hadamard rotation, mid-rise codes; quasi-random on Mamba-1 families
    "gate": "gsq-gate",
    "budget": "gsq-budget",  # high copies in K < units slots
    "entropy": "gsq-entropy",  # a row signal from the logits
    "stochastic-int4": {"policy": "static", "format": "int4", "rounding": "stochastic", "seed": 5},
    "held-gsq-4bit": {"policy": "static", "format": "midrise4-e4m3up-hadamard", "scale_hold": 0.5},  # held scales
}


def record_steps(monkeypatch) -> list[dict]:
    """Spy on every decode step: the layer's storage and rounding generator before it, its inputs, its output."""
    steps = []
    original = mamba_adapter.decode_step

    def spy(layer, x, dt, A, B, C, D, z, conv_history=None):
        cache = layer.cache
        generator = layer.generator(x.device)  # a torch.Generator (its state is kept), a QuasiRandom or None
        if isinstance(generator, torch.Generator):
            generator = generator.get_state()
        before = dict(storage=layer.storage, generator=generator,
                      row_signal=cache.row_signal_for(x.shape[0]), inputs=(x, dt, A, B, C, D, z))
        y = original(layer, x, dt, A, B, C, D, z, conv_history)
        steps.append(before | dict(layer=layer, y=y, after=layer.storage, gate=layer.last_gate))
        return y

    monkeypatch.setattr(mamba_adapter, "decode_step", spy)
    monkeypatch.setattr(step_module, "decode_step", spy)  # Mamba2's, called by gsq_hf.step.decode_step_conv
    return steps


def replay(step: dict):
    cache, before = step["layer"].cache, step["storage"]
    generator = step["generator"]
    if isinstance(generator, torch.Tensor):
        generator = torch.Generator().set_state(generator)
    return state_update_reference(
        before.low, before.high, before.high_valid, *step["inputs"], policy=cache.policy,
        group_size=cache.config.group_size, rounding=cache.config.rounding, row_signal=step["row_signal"],
        return_gate=True, scale_hold=cache.config.scale_hold, slot_units=before.slot_units, fallback=before.fallback,
        fallback_mask=before.fallback_mask, generator=generator)


def assert_same(a, b) -> None:
    if a is None or b is None:
        assert a is None and b is None
    elif isinstance(a, torch.Tensor):  # equal, NaN where NaN (a non-finite unit's row)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:  # QuantizedTensor
        assert a.fmt == b.fmt and a.group_size == b.group_size and torch.equal(a.data, b.data)
        assert_same(a.scale, b.scale)
        assert_same(a.row_scale, b.row_scale)


def check_replays(steps: list[dict]) -> None:
    assert steps
    for step in steps:
        twin, after = replay(step), step["after"]
        assert_same(twin.y, step["y"].to(twin.y.dtype))
        for name in ("low", "high", "high_valid", "slot_units", "fallback", "fallback_mask"):
            assert_same(getattr(twin, name), getattr(after, name))
        if "gate" in step["layer"].cache.policy.signals:
            assert_same(twin.gate, step["gate"])


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_twin_replays_every_torch_decode_step(family, config, monkeypatch):
    model = gsq_hf.patch(MODELS[family](), CONFIGS[config])
    steps = record_steps(monkeypatch)
    ids = torch.randint(2, 64, (2, 4), generator=torch.Generator().manual_seed(0))
    model.generate(ids, min_new_tokens=3, max_new_tokens=3, do_sample=False)
    assert len(steps) == 2 * len(steps[0]["layer"].cache.gsq_layers)  # two decode forwards (the prefill scans)
    assert {step["layer"].kernel_reason for step in steps} == {"tensors not on CUDA (kernel='auto' runs the "
                                                              "kernel on CUDA only)"}
    check_replays(steps)
    if config == "budget":
        assert steps[-1]["after"].slot_units is not None


def test_twin_replays_a_step_over_fp32_fallback_units(monkeypatch):
    model = gsq_hf.patch(tiny_mamba(), "int8")
    ids = torch.randint(2, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    cache = model(ids).cache
    layer = cache.gsq_layers[0]
    state = layer.read_ssm().clone()
    state[1, 3, 0] = float("inf")  # one unit of one row
    with pytest.warns(RuntimeWarning, match="non-finite SSM state in layer 0"):
        layer.write_ssm(state, None, read_back=False)
    steps = record_steps(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the unit stays non-finite: warned again at each write
        model(ids[:, :1], cache=cache)
    assert steps[0]["storage"].fallback_mask[1, 3] and steps[0]["storage"].fallback_mask.sum() == 1
    check_replays(steps)

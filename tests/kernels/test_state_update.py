"""The fused state update (Triton) against its torch reference twin, on tiny Mamba and Mamba2 shapes.

Runs on CUDA when a GPU is present, else on CPU through Triton's interpreter when the process starts with
``TRITON_INTERPRET=1`` (``TRITON_INTERPRET=1 python -m pytest -q tests/kernels``; it must be set before
anything imports triton, and torch itself does, so a test cannot switch it on). Skipped otherwise, and when
triton is not installed (``pip install "gsq_hf[triton]"``).

Tolerances. The kernel and the reference compute the same fp32 state ``h`` up to a few ulps (their exp
and sums differ in the last bits), so with round-to-nearest they store the same codes except where ``h``
sits within those ulps of a rounding tie:

=========================  ==========================================  =================================
what                       round-to-nearest: kernel vs reference       stochastic: kernel vs fp32 ``h``
=========================  ==========================================  =================================
codes (int) / values       ≤ 1% differ                                 not compared bit for bit
stored state, dequantized  ≤ one grid step + 1e-5·|value|               ≤ one grid step + 1e-5·|value|
fp32 stored state          ≤ 2e-5·|value| + 1e-6                        same
rounding statistics        —                                           P(round up) = fraction, ±4σ
y (fp32 inputs)            ≤ 1e-4 relative + 1e-4                       same (y uses the fp32 state)
y (bf16 inputs)            ≤ 2**-7 relative + 1e-3                      —
gate                       ≤ 1e-6                                       same
high mask                  equal where |gate − threshold| > 1e-5        same
=========================  ==========================================  =================================

One grid step: the scale for int8/int4 (one code); for fp8/bf16/fp16 the format's spacing at the value
(2**(max(floor(log2|v|), min_exp) − mantissa_bits), times the group scale for fp8).
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernel needs triton: pip install 'gsq_hf[triton]'",
                    exc_type=ImportError)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device: run with TRITON_INTERPRET=1 to test the kernel on CPU (Triton's interpreter)",
                allow_module_level=True)

from gsq_hf.formats import QuantizedTensor, StateFormat, get_format  # noqa: E402
from gsq_hf.kernels import state_update_reference, unsupported_reason  # noqa: E402
from gsq_hf.kernels.reference import KERNEL_FORMATS, read_state  # noqa: E402
from gsq_hf.kernels.state_update import state_update  # noqa: E402
from gsq_hf.policies import (  # noqa: E402
    EntropyThresholdPolicy,
    GateBudgetPolicy,
    GateThresholdPolicy,
    StaticPolicy,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 16
F = get_format

# name -> (policy, group_size, row_signal)
CASES = {f"static-{name}": (StaticPolicy(F(name)), None, None) for name in sorted(KERNEL_FORMATS)} | {
    "static-int8-g4": (StaticPolicy(F("int8")), 4, None),
    "static-int4-g4": (StaticPolicy(F("int4")), 4, None),
    "static-fp8-g4": (StaticPolicy(F("fp8")), 4, None),
    "gate-open-int8/fp16": (GateThresholdPolicy(F("int8"), F("fp16"), 0.3, "open"), None, None),
    "gate-closed-int4/int8": (GateThresholdPolicy(F("int4"), F("int8"), 0.3, "closed"), None, None),
    "gate-open-fp8/bf16-g8": (GateThresholdPolicy(F("fp8"), F("bf16"), 0.5, "open"), 8, None),
    "entropy-int4/fp32": (EntropyThresholdPolicy(F("int4"), F("fp32"), 0.5), None, [0.2, 0.8]),
    "entropy-first-int4/fp16": (EntropyThresholdPolicy(F("int4"), F("fp16"), 0.5), None, None),
}


def make_inputs(family: str, policy, group: int | None, row_signal, seed: int = 0, batch: int = 2, units: int = 6,
                dtype=torch.float32) -> dict:
    """A stored state (high copies valid on about half the units) and one step's inputs, on DEVICE.

    Mamba: (batch, units, N) channels; Mamba2: (batch, units, 3, N) heads of 3 rows, 2 groups of B/C.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    shape = (batch, units, N) if family == "mamba" else (batch, units, 3, N)
    group = group or N
    low = policy.low.quantize(randn(*shape), group)
    high = valid = None
    if policy.high is not None:
        high = policy.high.quantize(2 * randn(*shape), group)
        valid = torch.rand(batch, units, generator=g) < 0.5
    inputs = dict(low=low, high=high, high_valid=valid, dt_bias=0.5 * randn(units), dt_softplus=True, D=randn(units))
    if family == "mamba":
        inputs |= dict(x=randn(batch, units), dt=2 * randn(batch, units) - 1, A=-torch.exp(randn(units, N)),
                       B=randn(batch, N), C=randn(batch, N), z=randn(batch, units))
    else:
        inputs |= dict(x=randn(batch, units, 3), dt=2 * randn(batch, units) - 1, A=-torch.exp(randn(units)),
                       B=randn(batch, 2, N), C=randn(batch, 2, N))
    for name in ("x", "B", "C", "z"):
        if name in inputs:
            inputs[name] = inputs[name].to(dtype)
    inputs = {k: v.map(lambda t: t.to(DEVICE)) if isinstance(v, QuantizedTensor) else
              v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    options = dict(policy=policy, group_size=group, return_gate=True,
                   row_signal=None if row_signal is None else torch.tensor(row_signal, device=DEVICE))
    return inputs | options


def fresh_state(inputs: dict) -> torch.Tensor:
    """The fp32 state after the step, before any rounding (the reference with an fp32 store)."""
    fp32 = StaticPolicy(F("fp32"))
    stored = fp32.low.quantize(read_state(inputs["low"], inputs["high"], inputs["high_valid"]), N)
    args = inputs | dict(low=stored, high=None, high_valid=None, policy=fp32, group_size=None, row_signal=None)
    return state_update_reference(**args).low.data


def grid_step(fmt: StateFormat, values: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """One step of ``fmt``'s grid at each of ``values`` (dequantized units), using the scales of ``q``."""
    if fmt.name == "fp32":
        return 1e-5 * values.abs() + 1e-6
    scale = torch.ones_like(values)
    if q.scale is not None:
        scale = q.scale.repeat_interleave(q.group_size, dim=-1)
    if fmt.kind == "int":
        return scale
    _, exponent = torch.frexp(values / scale)
    return torch.ldexp(torch.ones_like(values), (exponent - 1).clamp(min=fmt.min_exponent) - fmt.mantissa_bits) * scale


def codes(q: QuantizedTensor) -> torch.Tensor:
    return q.fmt._unpack(q.data).float() if q.fmt.kind == "int" else q.data.float()


def units_view(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (batch, units) mask broadcast over a state's inner dims."""
    return mask.view(*mask.shape, *([1] * (like.dim() - 2))).expand_as(like)


def check_common(kernel, ref, inputs: dict) -> torch.Tensor | None:
    """y, gate and high mask; returns the units whose high copies both sides hold (None for static)."""
    torch.testing.assert_close(kernel.y, ref.y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernel.gate, ref.gate, rtol=0, atol=1e-6)
    if ref.high_valid is None:
        assert kernel.high_valid is None and kernel.high is None
        return None
    policy = inputs["policy"]
    near = (ref.gate - policy.threshold).abs() < 1e-5 if isinstance(policy, GateThresholdPolicy) else False
    assert not ((kernel.high_valid != ref.high_valid) & ~near).any()
    return kernel.high_valid & ref.high_valid


def check_nearest(kernel_q: QuantizedTensor, ref_q: QuantizedTensor, where: torch.Tensor) -> None:
    k, r = kernel_q.dequantize(), ref_q.dequantize()
    step = torch.maximum(grid_step(ref_q.fmt, r, ref_q), grid_step(ref_q.fmt, k, kernel_q))
    assert ((k - r).abs() <= step * (1 + 1e-5) + 1e-5 * r.abs())[where].all()
    if ref_q.fmt.name != "fp32":
        differ = (codes(kernel_q).view(k.shape) != codes(ref_q).view(r.shape))[where]
        assert differ.sum() <= 0.01 * differ.numel()


def check_one_step(q: QuantizedTensor, h: torch.Tensor, where: torch.Tensor) -> None:
    k = q.dequantize()
    step = torch.maximum(grid_step(q.fmt, h, q), grid_step(q.fmt, k, q))
    assert ((k - h).abs() <= step * (1 + 1e-5) + 1e-5 * h.abs())[where].all()


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_nearest_matches_reference(family, case):
    inputs = make_inputs(family, *CASES[case])
    kernel, ref = state_update(**inputs), state_update_reference(**inputs)
    both_high = check_common(kernel, ref, inputs)
    if ref.high_valid is not None and inputs["row_signal"] is not None or "gate" in case:
        assert 0 < ref.high_valid.sum() < ref.high_valid.numel()  # both formats are written
    check_nearest(kernel.low, ref.low, torch.ones_like(ref.low.dequantize(), dtype=torch.bool))
    if both_high is not None:
        check_nearest(kernel.high, ref.high, units_view(both_high, ref.low.dequantize()))


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_stochastic_within_one_step(family, case):
    inputs = make_inputs(family, *CASES[case]) | dict(rounding="stochastic", seed=3, step=5)
    kernel, ref = state_update(**inputs), state_update_reference(**inputs)
    both_high = check_common(kernel, ref, inputs)
    h = fresh_state(inputs)
    everywhere = torch.ones_like(h, dtype=torch.bool)
    check_one_step(kernel.low, h, everywhere)
    check_one_step(ref.low, h, everywhere)
    if both_high is not None:
        check_one_step(kernel.high, h, units_view(both_high, h))


@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16", "fp8"])
def test_stochastic_rounding_is_unbiased(fmt):
    """Each value rounds up with probability equal to its distance from the lower grid point (±4σ),
    over all values and separately over those nearer the lower or the upper point (nearest would fail these)."""
    policy = StaticPolicy(F(fmt))
    ups, fractions = [], []
    for step in range(4):
        inputs = make_inputs("mamba", policy, None, None, seed=11, batch=4, units=16) | dict(
            rounding="stochastic", seed=7, step=step)
        q = state_update(**inputs).low
        h = fresh_state(inputs)
        spacing = grid_step(q.fmt, h, q)
        lower = torch.floor(h / spacing) * spacing
        ups.append(q.dequantize() > lower + spacing / 2)
        fractions.append((h - lower) / spacing)
    up, fraction = torch.cat(ups).flatten().float(), torch.cat(fractions).flatten()
    for subset in (fraction >= 0, fraction < 0.5, fraction >= 0.5):
        excess = (up[subset] - fraction[subset]).sum()
        sigma = (fraction[subset] * (1 - fraction[subset])).sum().sqrt()
        assert excess.abs() <= 4 * sigma + 1, (fmt, excess.item(), sigma.item())


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_stochastic_noise_follows_seed_and_step(family):
    policy = GateThresholdPolicy(F("int4"), F("fp8"), 0.3, "open")
    inputs = make_inputs(family, policy, None, None) | dict(rounding="stochastic", seed=1)

    def bits(**kw):
        out = state_update(**(inputs | kw))
        high = out.high.data[units_view(out.high_valid, out.high.data)]
        return torch.cat([out.low.data.flatten().float(), high.float()])

    first = bits(step=4)
    assert torch.equal(first, bits(step=4))
    assert torch.equal(first, bits(step=torch.tensor([4], device=DEVICE)))  # a step counter kept on the device
    assert not torch.equal(first, bits(step=5))
    assert not torch.equal(first, bits(step=4, seed=2))


def test_low_and_high_copies_draw_independent_noise():
    policy = GateThresholdPolicy(F("int8"), F("int8"), 0.0, "open")  # every unit high, in the same format
    out = state_update(**make_inputs("mamba", policy, None, None), rounding="stochastic", step=1)
    assert out.high_valid.all()
    assert not torch.equal(out.low.data, out.high.data)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_inplace_with_several_programs_per_unit_row(family):
    """Tiles smaller than a row of channels / a head: several programs, same result, also written in place.

    Row flags (entropy policy) decide here, so that a reordered sum cannot move a gate across a threshold.
    """
    policy = EntropyThresholdPolicy(F("int8"), F("bf16"), 0.5)
    inputs = make_inputs(family, policy, None, [0.2, 0.8])
    expected = state_update(**inputs)
    out = state_update(**inputs, inplace=True, block_rows=2)
    assert out.low is inputs["low"] and out.high is inputs["high"]
    torch.testing.assert_close(out.y, expected.y, rtol=1e-6, atol=1e-6)  # sums may be reordered by the tiling
    assert torch.equal(out.high_valid, expected.high_valid)
    assert torch.equal(out.low.data, expected.low.data) and torch.equal(out.low.scale, expected.low.scale)
    high = units_view(expected.high_valid, expected.high.data)
    assert torch.equal(out.high.data[high], expected.high.data[high])


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_model_dtype_inputs(family):
    """bf16 activations (x, B, C, z) as a bf16 model passes them; y comes back in bf16.

    The kernel sums in fp32 and rounds y once; the twin (the torch path, as upstream's slow path) reads out
    ``h.to(bf16) @ C`` and (Mamba2) adds the skip in bf16: each rounding moves a term by at most 2**-8 of it,
    so |Δy| <= 2**-7 · (Σ_n |h_n C_n| + |D x| + |y|) (a margin of two on the roundings' sum), plus 1e-3.
    """
    inputs = make_inputs(family, StaticPolicy(F("int8")), None, None, dtype=torch.bfloat16)
    kernel, ref = state_update(**inputs), state_update_reference(**inputs)
    assert kernel.y.dtype == torch.bfloat16
    h, C, x = fresh_state(inputs), inputs["C"].float(), inputs["x"].float()
    if family == "mamba":
        terms, skip = (h * C[:, None, :]).abs().sum(-1), (x * inputs["D"]).abs()
    else:
        C = C.repeat_interleave(h.shape[1] // C.shape[1], dim=1)[:, :, None, :]
        terms, skip = (h * C).abs().sum(-1), (x * inputs["D"][:, None]).abs()
    bound = 2**-7 * (terms + skip + ref.y.float().abs()) + 1e-3
    if family == "mamba":  # silu(z) multiplies the whole output (in bf16 on the twin's side: one more rounding)
        bound = bound * torch.nn.functional.silu(inputs["z"].float()).abs() + 2**-8 * ref.y.float().abs()
    assert ((kernel.y.float() - ref.y.float()).abs() <= bound).all()
    check_nearest(kernel.low, ref.low, torch.ones_like(ref.low.dequantize(), dtype=torch.bool))


def test_unsupported_cases_say_why():
    budget = GateBudgetPolicy(F("int4"), F("fp16"), 0.25)
    inputs = make_inputs("mamba", GateThresholdPolicy(F("int4"), F("fp16"), 0.3), None, None)
    with pytest.raises(NotImplementedError, match="GateBudgetPolicy has no kernel rule"):
        state_update(**(inputs | dict(policy=budget)))
    mamba2 = make_inputs("mamba2", StaticPolicy(F("int8")), None, None)
    assert "z gate" in unsupported_reason(mamba2["policy"], mamba2["low"], None, mamba2["A"], mamba2["x"], None)
    low = F("int8").quantize(torch.zeros(1, 2, 12), 12)
    assert "powers of two" in unsupported_reason(StaticPolicy(F("int8")), low, None, torch.zeros(2, 12), None, None)
    int3 = F("int3").quantize(torch.zeros(1, 2, 16), 16)
    assert "int3" in unsupported_reason(StaticPolicy(F("int3")), int3, None, torch.zeros(2, 16), None, None)

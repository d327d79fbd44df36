"""The fused state update (Triton) against its torch reference twin, on tiny Mamba and Mamba2 shapes.

Runs on CUDA when a GPU is present, else on CPU through Triton's interpreter when the process starts with
``TRITON_INTERPRET=1`` (``TRITON_INTERPRET=1 python -m pytest -q tests/kernels``; it must be set before
anything imports triton, and torch itself does, so a test cannot switch it on). Skipped otherwise, and when
triton is not installed (``pip install "gsq_hf[triton]"``).

Tolerances. The kernel and the reference compute the same fp32 state ``h`` up to a few ulps (their exp
and sums differ in the last bits; both update a rotated Mamba2 state in the rotated basis, rotating B and C,
each with its own butterfly), so with round-to-nearest they store the same codes except where ``h`` sits
within those ulps of a rounding tie. Stored values are compared in the stored basis (a rotated format's
values before the inverse rotation), where each one is rounded on its own:

=========================  ==========================================  =================================
what                       round-to-nearest: kernel vs reference       stochastic: kernel vs fp32 ``h``
=========================  ==========================================  =================================
codes (int) / values       ≤ 1% differ                                 not compared bit for bit
stored state (stored       ≤ one grid step + 1e-5·|value|               ≤ one grid step + 1e-5·|value|
basis)                                                                 (+ how far a value a rounded
                                                                       scale left past the top level
                                                                       lies beyond it: clamped)
group scales as stored     ≤ 1e-5 relative (fp16 / e4m3: equal but     same, kernel vs reference
(fp32 / fp16 / e4m3),      at a rounding tie)
e4m3 row scales
fp32 stored state          ≤ 2e-5·|value| + 1e-6                        same
rounding statistics        —                                           P(round up) = fraction, ±4σ
y (fp32 inputs)            ≤ 1e-4 relative + 1e-4                       same (y uses the fp32 state)
y (bf16 inputs)            ≤ 2**-7 relative + 1e-3                      —
gate                       ≤ 1e-6                                       same
high mask                  equal where |gate − threshold| > 1e-5        same
=========================  ==========================================  =================================

One grid step: the value's scale for int / mid-rise codes (one code; e4m3: the stored group scale times the
row scale); for fp8/bf16/fp16 the format's spacing at the value (2**(max(floor(log2|v|), min_exp) −
mantissa_bits), times the group scale for fp8).
"""

from dataclasses import replace

import needs_kernel  # noqa: F401  (skips this module where the kernel cannot run)
import pytest
import torch

from gsq_hf.formats import QuantizedTensor, StateFormat, _hadamard, get_format  # noqa: E402
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

# name -> (policy, group_size, row_signal): every code grid, packing, scale dtype and rotation the kernel
# stores, alone and as the low or high copy of a threshold policy (mixed bases: one copy rotated, one not)
STATIC = ["fp32", "bf16", "fp16", "fp8", "int8", "int6", "int5", "int4", "int3", "int2", "midrise8", "midrise4",
          "midrise3", "int8-fp16", "int4-e4m3", "int8-e4m3", "fp8-e4m3", "int4-e8m0", "midrise3-e8m0-hadamard",
          "fp32-hadamard", "bf16-hadamard",
          "int4-hadamard", "int8-e4m3-hadamard", "int4-e4m3-hadamard", "midrise4-e4m3-hadamard",
          "midrise3-e4m3-hadamard", "midrise4-e4m3up-hadamard", "int4-log8", "midrise4-log8-hadamard",
          "midrise3-log8-hadamard"]
CASES = {f"static-{name}": (StaticPolicy(F(name)), None, None) for name in STATIC} | {
    "static-int8-g4": (StaticPolicy(F("int8")), 4, None),
    "static-int4-g4": (StaticPolicy(F("int4")), 4, None),
    "static-fp8-g4": (StaticPolicy(F("fp8")), 4, None),
    "static-int4-e4m3-g4": (StaticPolicy(F("int4-e4m3")), 4, None),
    "static-midrise3-e4m3-hadamard-g8": (StaticPolicy(F("midrise3-e4m3-hadamard")), 8, None),
    "gate-open-int8/fp16": (GateThresholdPolicy(F("int8"), F("fp16"), 0.3, "open"), None, None),
    "gate-closed-int4/int8": (GateThresholdPolicy(F("int4"), F("int8"), 0.3, "closed"), None, None),
    "gate-open-fp8/bf16-g8": (GateThresholdPolicy(F("fp8"), F("bf16"), 0.5, "open"), 8, None),
    "gate-open-midrise3-e4m3-hadamard/int8-e4m3": (
        GateThresholdPolicy(F("midrise3-e4m3-hadamard"), F("int8-e4m3"), 0.3, "open"), None, None),
    "gate-closed-int4-e4m3/midrise4-e4m3-hadamard": (
        GateThresholdPolicy(F("int4-e4m3"), F("midrise4-e4m3-hadamard"), 0.3, "closed"), None, None),
    "entropy-int4/fp32": (EntropyThresholdPolicy(F("int4"), F("fp32"), 0.5), None, [0.2, 0.8]),
    "entropy-first-int4/fp16": (EntropyThresholdPolicy(F("int4"), F("fp16"), 0.5), None, None),
    "entropy-midrise4-e4m3-hadamard/fp16-hadamard": (
        EntropyThresholdPolicy(F("midrise4-e4m3-hadamard"), F("fp16-hadamard"), 0.5), None, [0.2, 0.8]),
}
assert {f.name for policy, _, _ in CASES.values() for f in policy.formats} <= KERNEL_FORMATS


def make_inputs(family: str, policy, group: int | None, row_signal, seed: int = 0, batch: int = 2, units: int = 6,
                dtype=torch.float32, n: int = N) -> dict:
    """A stored state (high copies valid on about half the units) and one step's inputs, on DEVICE.

    Mamba: (batch, units, N) channels; Mamba2: (batch, units, 3, N) heads of 3 rows, 2 groups of B/C.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    shape = (batch, units, n) if family == "mamba" else (batch, units, 3, n)
    group = group or n
    low = policy.low.quantize(randn(*shape), group)
    high = valid = None
    if policy.high is not None:
        high = policy.high.quantize(2 * randn(*shape), group)
        valid = torch.rand(batch, units, generator=g) < 0.5
    inputs = dict(low=low, high=high, high_valid=valid, dt_bias=0.5 * randn(units), dt_softplus=True, D=randn(units))
    if family == "mamba":
        inputs |= dict(x=randn(batch, units), dt=2 * randn(batch, units) - 1, A=-torch.exp(randn(units, n)),
                       B=randn(batch, n), C=randn(batch, n), z=randn(batch, units))
    else:
        inputs |= dict(x=randn(batch, units, 3), dt=2 * randn(batch, units) - 1, A=-torch.exp(randn(units)),
                       B=randn(batch, 2, n), C=randn(batch, 2, n))
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
    state = read_state(inputs["low"], inputs["high"], inputs["high_valid"])
    stored = fp32.low.quantize(state, state.shape[-1])
    args = inputs | dict(low=stored, high=None, high_valid=None, policy=fp32, group_size=None, row_signal=None)
    return state_update_reference(**args).low.data


def stored_values(q: QuantizedTensor) -> torch.Tensor:
    """The values ``q`` stores, in its stored basis (a rotated format's, before the inverse rotation)."""
    return replace(q, fmt=replace(q.fmt, rotation=None)).dequantize()


def in_stored_basis(fmt: StateFormat, h: torch.Tensor) -> torch.Tensor:
    return h @ _hadamard(h.shape[-1], h.device) if fmt.rotation is not None else h


def value_scale(q: QuantizedTensor, values: torch.Tensor) -> torch.Tensor:
    """The scale each value is stored against (for e4m3: the group's stored scale times the row scale)."""
    if q.scale is None:
        return torch.ones_like(values)
    return q.fmt._load_scale(q).float().repeat_interleave(q.group_size, dim=-1)


def grid_step(q: QuantizedTensor, values: torch.Tensor) -> torch.Tensor:
    """One step of ``q.fmt``'s grid at each of ``values`` (stored basis), using the scales of ``q``."""
    fmt = q.fmt
    if fmt.kind == "float" and fmt.storage_dtype == torch.float32:
        return 1e-5 * values.abs() + 1e-6
    scale = value_scale(q, values)
    if fmt.kind == "int":
        return scale
    _, exponent = torch.frexp(values / scale)
    return torch.ldexp(torch.ones_like(values), (exponent - 1).clamp(min=fmt.min_exponent) - fmt.mantissa_bits) * scale


def beyond_grid(q: QuantizedTensor, h: torch.Tensor) -> torch.Tensor:
    """How far |h| lies past the largest level: a rounded (fp16 / e4m3) scale may leave values there, clamped."""
    if not q.fmt.scaled:
        return torch.zeros_like(h)
    return (h.abs() - q.fmt.max_code * value_scale(q, h)).clamp(min=0)


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


def check_scales(kernel_q: QuantizedTensor, ref_q: QuantizedTensor, units: torch.Tensor) -> None:
    """Group scales as stored (fp32, fp16 or e4m3 ratios) and e4m3 row scales agree to float rounding."""
    assert (kernel_q.scale is None) == (ref_q.scale is None) and kernel_q.scale.dtype == ref_q.scale.dtype
    where = units_view(units, ref_q.scale)
    torch.testing.assert_close(kernel_q.scale.float()[where], ref_q.scale.float()[where], rtol=1e-5, atol=0)
    if ref_q.row_scale is not None:
        torch.testing.assert_close(kernel_q.row_scale, ref_q.row_scale, rtol=1e-5, atol=0)


def check_nearest(kernel_q: QuantizedTensor, ref_q: QuantizedTensor, units: torch.Tensor) -> None:
    k, r = stored_values(kernel_q), stored_values(ref_q)
    where = units_view(units, r)
    step = torch.maximum(grid_step(ref_q, r), grid_step(kernel_q, k))
    assert ((k - r).abs() <= step * (1 + 1e-5) + 1e-5 * r.abs())[where].all()
    if ref_q.scale is not None:
        check_scales(kernel_q, ref_q, units)
    if ref_q.fmt.storage_dtype != torch.float32:  # fp32 values (rotated or not) differ in the last bits
        differ = (codes(kernel_q).view(k.shape) != codes(ref_q).view(r.shape))[where]
        assert differ.sum() <= 0.01 * differ.numel()


def check_one_step(q: QuantizedTensor, h: torch.Tensor, units: torch.Tensor) -> None:
    k, h = stored_values(q), in_stored_basis(q.fmt, h)
    step = torch.maximum(grid_step(q, h), grid_step(q, k))
    assert ((k - h).abs() <= step * (1 + 1e-5) + 1e-5 * h.abs() + beyond_grid(q, h))[units_view(units, h)].all()


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_nearest_matches_reference(family, case):
    inputs = make_inputs(family, *CASES[case])
    kernel, ref = state_update(**inputs), state_update_reference(**inputs)
    both_high = check_common(kernel, ref, inputs)
    if ref.high_valid is not None and inputs["row_signal"] is not None or "gate" in case:
        assert 0 < ref.high_valid.sum() < ref.high_valid.numel()  # both formats are written
    check_nearest(kernel.low, ref.low, torch.ones_like(ref.gate, dtype=torch.bool))
    if both_high is not None:
        check_nearest(kernel.high, ref.high, both_high)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("case", ["static-int4", "static-midrise3-e4m3-hadamard-g8", "static-fp8-g4",
                                  "gate-closed-int4-e4m3/midrise4-e4m3-hadamard", "entropy-int4/fp32"])
@pytest.mark.parametrize("step", [0, 1, torch.tensor([2**33 + 5])])
def test_quasirandom_matches_reference(family, case, step):
    """Quasi-random thresholds are the same bits in the kernel and `gsq_hf.formats.QuasiRandom` (a step past
    2**32 included: it counts mod 2**32 on both sides), so both store what round-to-nearest's twins do: the
    same codes but where ``h`` differs in the last ulps at a threshold."""
    step = step.to(DEVICE) if torch.is_tensor(step) else step
    inputs = make_inputs(family, *CASES[case]) | dict(rounding="quasirandom", seed=2**40 + 3, step=step)
    kernel, ref = state_update(**inputs), state_update_reference(**inputs)
    both_high = check_common(kernel, ref, inputs)
    check_nearest(kernel.low, ref.low, torch.ones_like(ref.gate, dtype=torch.bool))
    if both_high is not None:
        check_nearest(kernel.high, ref.high, both_high)
    nearest = state_update_reference(**inputs | dict(rounding="nearest"))
    assert not torch.equal(codes(ref.low), codes(nearest.low))  # the thresholds are not all one half


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_stochastic_within_one_step(family, case):
    inputs = make_inputs(family, *CASES[case]) | dict(rounding="stochastic", seed=3, step=5)
    kernel, ref = state_update(**inputs), state_update_reference(**inputs)
    both_high = check_common(kernel, ref, inputs)
    h = fresh_state(inputs)
    everywhere = torch.ones_like(ref.gate, dtype=torch.bool)
    check_one_step(kernel.low, h, everywhere)
    check_one_step(ref.low, h, everywhere)
    if ref.low.scale is not None:
        check_scales(kernel.low, ref.low, everywhere)  # scales do not depend on the rounding of the codes
    if both_high is not None:
        check_one_step(kernel.high, h, both_high)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("n", [4, 8, 64, 128])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_other_d_states(family, n, rounding):
    """d_state 4 … 128 (Mamba2's is 128): butterflies of 2 … 7 stages, packed blocks from 1 to 16 per row,
    e4m3 groups of 4 inside rows, a rotated low copy next to an unrotated high one."""
    fmt = "midrise3-e4m3-hadamard" if n % 8 == 0 else "int4-e4m3-hadamard"
    policy = EntropyThresholdPolicy(F(fmt), F("int8-e4m3"), 0.5)
    inputs = make_inputs(family, policy, 4, [0.2, 0.8], n=n) | dict(rounding=rounding, seed=5, step=2)
    kernel, ref = state_update(**inputs), state_update_reference(**inputs)
    both_high = check_common(kernel, ref, inputs)
    everywhere = torch.ones_like(ref.gate, dtype=torch.bool)
    check_scales(kernel.low, ref.low, everywhere)
    if rounding == "nearest":
        check_nearest(kernel.low, ref.low, everywhere)
        check_nearest(kernel.high, ref.high, both_high)
    else:
        h = fresh_state(inputs)
        check_one_step(kernel.low, h, everywhere)
        check_one_step(kernel.high, h, both_high)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("fmt", ["int4-e4m3-hadamard", "midrise3-e4m3", "midrise3-log8", "int4-e8m0", "midrise3-e8m0",
                                 "fp8-e4m3", "int8-fp16"])
def test_all_zero_rows_store_what_the_reference_stores(family, fmt):
    """A batch row whose state stays zero (x = 0 on a zero state; e.g. padding): zero group scales, an e4m3
    row scale of 0 and e8m0's smallest exponent (-127), bit for bit; the other batch row is unaffected.
    Mid-rise codes have no zero level: with an e8m0 scale a zero group reads back ±2**-128, no more."""
    policy = StaticPolicy(F(fmt))
    inputs = make_inputs(family, policy, 8, None)
    low = inputs["low"]
    zero_row = policy.low.quantize(torch.zeros(1, *low.shape[1:]), 8)
    low = replace(low, data=torch.cat([zero_row.data, low.data[1:]]), scale=torch.cat([zero_row.scale, low.scale[1:]]),
                  row_scale=None if low.row_scale is None else torch.cat([zero_row.row_scale, low.row_scale[1:]]))
    x = inputs["x"].clone()
    x[0] = 0
    inputs |= dict(low=low, x=x)
    kernel, ref = state_update(**inputs), state_update_reference(**inputs)
    assert torch.equal(kernel.low.scale[0].float(), ref.low.scale[0].float())
    assert torch.equal(kernel.low.data[0], ref.low.data[0]) and kernel.low.dequantize()[0].abs().max() <= 2.0**-128
    if ref.low.row_scale is not None:
        assert kernel.low.row_scale[0] == ref.low.row_scale[0] == 0
    check_nearest(kernel.low, ref.low, torch.ones_like(ref.gate, dtype=torch.bool))


STOCHASTIC_FORMATS = ("int8", "int4", "bf16", "fp8", "midrise4", "int4-e4m3-hadamard", "midrise3-e4m3-hadamard",
                      "midrise4-e4m3up-hadamard")


@pytest.mark.parametrize("fmt, n", [(fmt, N) for fmt in STOCHASTIC_FORMATS]
                         + [("int4", 4), ("midrise4-e4m3-hadamard", 8)])
def test_stochastic_rounding_is_unbiased(fmt, n):
    """Each value (in the stored basis) rounds up with probability equal to its distance from the grid point
    below (±4σ), over all values and separately over those nearer the lower or the upper point (nearest would
    fail these). Values a rounded e4m3 scale leaves past the largest level are clamped, not rounded: left out.
    d_state 4 draws 32-bit thresholds, four per Philox call; wider states 16-bit ones, eight per call."""
    policy = StaticPolicy(F(fmt))
    ups, fractions, surprise, variance = [], [], [], []
    for step in range(4 * N // n):  # as many values whatever n
        inputs = make_inputs("mamba", policy, None, None, seed=11, batch=4, units=16, n=n) | dict(
            rounding="stochastic", seed=7, step=step)
        q = state_update(**inputs).low
        h = in_stored_basis(q.fmt, fresh_state(inputs))
        spacing = grid_step(q, h)
        offset = 0.5 if q.fmt.midrise else 0.0  # mid-rise levels sit at (k + 0.5) steps
        lower = (torch.floor(h / spacing - offset) + offset) * spacing
        inside = beyond_grid(q, h) == 0
        rounded_up, distance = (stored_values(q) > lower + spacing / 2).float(), (h - lower) / spacing
        ups.append(rounded_up[inside])
        fractions.append(distance[inside])
        surprise.append(torch.where(inside, rounded_up - distance, 0.0))
        variance.append(torch.where(inside, distance * (1 - distance), 0.0))
    up, fraction = torch.cat(ups), torch.cat(fractions)
    assert up.numel() > 0.9 * 4 * 4 * 16 * N
    for subset in (fraction >= 0, fraction < 0.5, fraction >= 0.5):
        excess = (up[subset] - fraction[subset]).sum()
        sigma = (fraction[subset] * (1 - fraction[subset])).sum().sqrt()
        assert excess.abs() <= 4 * sigma + 1, (fmt, excess.item(), sigma.item())
    # neighbours (two halves of one 32-bit draw when n > 4) round independently: their surprises do not covary
    surprise, variance = torch.stack(surprise), torch.stack(variance)
    covariance = (surprise[..., 0::2] * surprise[..., 1::2]).sum()
    sigma = (variance[..., 0::2] * variance[..., 1::2]).sum().sqrt()
    assert covariance.abs() <= 4 * sigma + 1, (fmt, covariance.item(), sigma.item())


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
@pytest.mark.parametrize("low, high", [("int8", "bf16"), ("midrise3-e4m3-hadamard", "int8-e4m3")])
def test_inplace_with_several_programs_per_unit_row(family, low, high):
    """Tiles smaller than a row of channels / a head: several programs, same result, also written in place
    (e4m3: the row maximum gathers over the programs of a batch row, the row scale lands in the stored copy).

    Row flags (entropy policy) decide here, so that a reordered sum cannot move a gate across a threshold.
    """
    policy = EntropyThresholdPolicy(F(low), F(high), 0.5)
    inputs = make_inputs(family, policy, None, [0.2, 0.8])
    expected = state_update(**inputs)
    out = state_update(**inputs, inplace=True, block_rows=2)
    assert out.low is inputs["low"] and out.high is inputs["high"]
    torch.testing.assert_close(out.y, expected.y, rtol=1e-6, atol=1e-6)  # sums may be reordered by the tiling
    assert torch.equal(out.high_valid, expected.high_valid)
    assert torch.equal(out.low.data, expected.low.data) and torch.equal(out.low.scale, expected.low.scale)
    high = units_view(expected.high_valid, expected.high.data)
    assert torch.equal(out.high.data[high], expected.high.data[high])
    for mine, theirs in ((out.low, expected.low), (out.high, expected.high)):
        assert (mine.row_scale is None) == (theirs.row_scale is None)
        assert mine.row_scale is None or torch.equal(mine.row_scale, theirs.row_scale)


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
    check_nearest(kernel.low, ref.low, torch.ones(ref.low.shape[:2], dtype=torch.bool))


def test_unsupported_cases_say_why():
    budget = GateBudgetPolicy(F("int4"), F("fp16"), 0.25)
    inputs = make_inputs("mamba", GateThresholdPolicy(F("int4"), F("fp16"), 0.3), None, None)
    with pytest.raises(NotImplementedError, match="GateBudgetPolicy has no kernel rule"):
        state_update(**(inputs | dict(policy=budget)))
    mamba2 = make_inputs("mamba2", StaticPolicy(F("int8")), None, None)
    assert "z gate" in unsupported_reason(mamba2["policy"], mamba2["low"], None, mamba2["A"], mamba2["x"], None)
    low = F("int8").quantize(torch.zeros(1, 2, 12), 12)
    assert "powers of two" in unsupported_reason(StaticPolicy(F("int8")), low, None, torch.zeros(2, 12), None, None)
    nf4 = replace(F("int4"), name="nf4")  # a grid the kernel does not know (formats may add one)
    stored = replace(nf4.quantize(torch.zeros(1, 2, 16), 16), fmt=nf4)
    assert "['nf4']" in unsupported_reason(StaticPolicy(nf4), stored, None, torch.zeros(2, 16), None, None)


HELD = {  # name -> (family, policy, row_signal): held low copies; the entropy case's high copy, in the same format
    # (so that its scales could be held against the low copy's), stays fresh
    "mamba-int4": ("mamba", StaticPolicy(F("int4")), None),
    "mamba2-int4": ("mamba2", StaticPolicy(F("int4")), None),
    "mamba2-midrise4-e4m3up-hadamard": ("mamba2", StaticPolicy(F("midrise4-e4m3up-hadamard")), None),
    "mamba2-midrise4-e4m3-hadamard": ("mamba2", StaticPolicy(F("midrise4-e4m3-hadamard")), None),
    "mamba2-midrise4-log8-hadamard": ("mamba2", StaticPolicy(F("midrise4-log8-hadamard")), None),
    "mamba-entropy-midrise4-e4m3-hadamard-twice": (
        "mamba", EntropyThresholdPolicy(F("midrise4-e4m3-hadamard"), F("midrise4-e4m3-hadamard"), 0.5), [0.2, 0.8]),
}


def held_steps(case: str, rounding: str, steps: int = 4, hold: float = 0.6):
    """``steps`` consecutive steps with ``scale_hold=hold``, each from the twin's previous storage: (previous low
    copy, step inputs, kernel result, twin result, twin result with fresh scales) per step. A slow decay (Δ
    shifted down) and small inputs keep most groups within the hold, so that scales are held, not refreshed."""
    family, policy, row_signal = HELD[case]
    inputs = make_inputs(family, policy, None, row_signal)
    inputs |= dict(dt=inputs["dt"] - 3, rounding=rounding, seed=3, scale_hold=hold)
    g = torch.Generator().manual_seed(1)
    previous, results = inputs["low"], []
    for step in range(steps):
        x = (0.3 * torch.randn(inputs["x"].shape, generator=g)).to(DEVICE)
        args = inputs | dict(low=previous, x=x, step=step)
        ref = state_update_reference(**args)
        results.append((previous, args, state_update(**args), ref, state_update_reference(**(args | dict(
            scale_hold=0.0)))))
        previous = ref.low
    return results


def held(q: QuantizedTensor, previous: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where ``q`` stores its previous group scales (as stored) and, for e4m3, its previous row scale."""
    rows = None if q.row_scale is None else q.row_scale == previous.row_scale
    return q.scale.float() == previous.scale.float(), rows


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("case", sorted(HELD))
def test_held_scales_match_reference(case, rounding):
    """GSQConfig.scale_hold in the kernel: the same groups (and e4m3 rows) keep their previous scales as in the
    twin, over several steps and batch rows, where fresh scales would have moved some of them; the rest as
    without holding (stochastic: within one step of the fresh state, scales as the twin's)."""
    held_groups = kept_rows = 0
    for previous, args, kernel, ref, fresh in held_steps(case, rounding):
        both_high = check_common(kernel, ref, args)
        everywhere = torch.ones_like(ref.gate, dtype=torch.bool)
        (kernel_groups, kernel_rows), (ref_groups, ref_rows) = held(kernel.low, previous), held(ref.low, previous)
        fresh_groups, fresh_rows = held(fresh.low, previous)
        assert torch.equal(kernel_groups, ref_groups)
        held_groups += int((ref_groups & ~fresh_groups).sum())
        if ref_rows is not None:
            assert torch.equal(kernel_rows, ref_rows)
            kept_rows += int((ref_rows & ~fresh_rows).sum())
        if rounding == "nearest":
            check_nearest(kernel.low, ref.low, everywhere)
            if both_high is not None:
                check_nearest(kernel.high, ref.high, both_high)
        else:
            check_scales(kernel.low, ref.low, everywhere)
            h = fresh_state(args)
            check_one_step(kernel.low, h, everywhere)
            if both_high is not None:
                check_one_step(kernel.high, h, both_high)
    assert held_groups > 0  # scales a fresh write would have changed
    if "e4m3" in case or "log8" in case:
        assert kept_rows > 0


def test_held_scales_in_place_with_several_programs_per_unit_row():
    """Written in place by tiles of two rows: each program reads its groups' previous scales before storing its
    own, and the batch row's previous row scale stays readable until every program has read it."""
    for previous, args, kernel, _, _ in held_steps("mamba2-midrise4-e4m3-hadamard", "nearest", steps=2):
        low = previous.map(torch.clone)
        out = state_update(**(args | dict(low=low)), inplace=True, block_rows=2)
        assert out.low is low
        assert torch.equal(low.data, kernel.low.data) and torch.equal(low.scale.float(), kernel.low.scale.float())
        assert torch.equal(low.row_scale, kernel.low.row_scale)


def test_bad_scale_hold_is_a_clear_error():
    inputs = make_inputs("mamba", StaticPolicy(F("int4")), None, None)
    for bad in (1.0, -0.5, True):
        with pytest.raises(ValueError, match="scale_hold"):
            state_update(**inputs, scale_hold=bad)
        with pytest.raises(ValueError, match="scale_hold"):
            state_update_reference(**inputs, scale_hold=bad)

"""The decode step's conv in Triton (`gsq_hf.kernels.conv_step`, and inside Mamba2's state update) against the
torch path, on tiny shapes: CUDA when present, else Triton's interpreter (``TRITON_INTERPRET=1``, as
``test_state_update.py``).

Tolerances. The new stored window is the torch path's bit for bit, quantized ones included (the window is
divided by its scale as `gsq_hf.formats` does, not multiplied by a reciprocal: a re-stored grid value sits
exactly at a rounding tie whenever its window's scale doubles). The conv output
sums its K products in another order than ``conv1d``: fp32 within 1e-5 of the output's scale; bf16/fp16 within
one ulp of the dtype (2**-7 / 2**-10 relative) plus 1e-3. A Mamba2 step with its conv inside the state
update equals the same step after a separate conv launch (the same conv code, then the same state code), and is
within the state kernel's own tolerances (`test_state_update.py`) of the torch twin.
"""


import needs_kernel  # noqa: F401  (skips this module where the kernel cannot run)
import pytest
import torch
import torch.nn.functional as F

from gsq_hf.formats import QuantizedTensor, get_format  # noqa: E402
from gsq_hf.kernels.conv_step import conv_step  # noqa: E402
from gsq_hf.kernels.reference import (  # noqa: E402
    ConvStep,
    conv_step_reference,
    conv_unsupported_reason,
    split_xBC,
    state_update_reference,
)
from gsq_hf.kernels.state_update import state_update  # noqa: E402
from gsq_hf.policies import EntropyThresholdPolicy, GateThresholdPolicy, StaticPolicy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K = 4
F_ = get_format
ULP = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def make_conv(fmt: str, batch: int = 3, channels: int = 11, dtype=torch.float32, seed: int = 0) -> ConvStep:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    window = F_(fmt).quantize(randn(batch, channels, K).to(dtype), K)
    return ConvStep(window, randn(batch, channels).to(dtype), (0.5 * randn(channels, K)).to(dtype),
                    randn(channels).to(dtype))


def assert_same_window(kernel: QuantizedTensor, reference: QuantizedTensor) -> None:
    """The same stored bytes: codes (or values) and scales."""
    assert kernel.fmt == reference.fmt and kernel.group_size == reference.group_size
    assert torch.equal(kernel.data, reference.data)
    assert (kernel.scale is None) == (reference.scale is None)
    assert kernel.scale is None or torch.equal(kernel.scale, reference.scale)


def assert_close_output(out: torch.Tensor, reference: torch.Tensor) -> None:
    assert out.dtype == reference.dtype and out.shape == reference.shape
    error = (out.float() - reference.float()).abs().max()
    assert error <= ULP[out.dtype] * reference.float().abs().max() + (1e-6 if out.dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("fmt, dtype", [
    ("fp32", torch.float32), ("int8", torch.float32), ("int4", torch.float32), ("midrise4", torch.float32),
    ("fp8", torch.float32), ("int8-fp16", torch.float32), ("int4-e8m0", torch.float32), ("bf16", torch.float32),
    ("bf16", torch.bfloat16), ("fp16", torch.float16), ("int8", torch.bfloat16), ("fp32", torch.bfloat16),
])
def test_conv_step_matches_the_torch_conv(fmt, dtype):
    """Every conv format the kernel stores, in the model dtypes; several programs per batch row, one part-full."""
    conv = make_conv(fmt, dtype=dtype)
    out, window = conv_step(conv, block=4)
    expected_out, expected_window = conv_step_reference(conv)
    assert_close_output(out, expected_out)
    assert_same_window(window, expected_window)


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_the_window_shifts_by_one_and_each_tap_reads_its_position(fmt):
    """Window (1, 2, 3, 4)·2**-c in channel c, token 5·2**-c, a one-hot weight at tap t: the output is silu of
    entry t of the window read, shifted by one with the token appended, and that shifted window is what is
    stored; an off-by-one in the shift, the append, the taps or the channels reads another value."""
    batch, channels = 2, 8
    scale = 2.0 ** -torch.arange(channels, dtype=torch.float32, device=DEVICE)
    values = torch.arange(1, K + 1, dtype=torch.float32, device=DEVICE) * scale[:, None]  # (C, K)
    window = F_(fmt).quantize(values.expand(batch, channels, K).contiguous(), K)
    u = (5 * scale).expand(batch, channels).contiguous()
    shifted = torch.cat([window.dequantize()[..., 1:], u[..., None]], dim=-1)  # (batch, C, K)
    for tap in range(K):
        weight = F.one_hot(torch.full((channels,), tap, device=DEVICE), K).float()
        conv = ConvStep(window, u, weight, None)
        for out, new in (conv_step(conv, block=4), conv_step_reference(conv)):
            torch.testing.assert_close(out, F.silu(shifted[..., tap]), rtol=1e-6, atol=0)  # one product: exact
            assert_same_window(new, F_(fmt).quantize(shifted, K))


def mamba2_case(policy, conv_fmt: str, batch: int = 2, heads: int = 4, head_dim: int = 3, groups: int = 2,
                n: int = 8, seed: int = 1, row_signal=None) -> dict:
    """A stored Mamba2 state (high copies valid on about half the heads), Δ, A, D, and the token's conv."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    shape = (batch, heads, head_dim, n)
    low = policy.low.quantize(randn(*shape), n)
    high = valid = None
    if policy.high is not None:
        high = policy.high.quantize(2 * randn(*shape), n)
        valid = (torch.rand(batch, heads, generator=g) < 0.5).to(DEVICE)
    conv = make_conv(conv_fmt, batch, heads * head_dim + 2 * groups * n, seed=seed + 1)
    return dict(low=low, high=high, high_valid=valid, x=None, dt=2 * randn(batch, heads) - 1,
                A=-torch.exp(randn(heads)), B=None, C=None, D=randn(heads), dt_bias=0.5 * randn(heads),
                dt_softplus=True, conv=conv, policy=policy, return_gate=True,
                row_signal=None if row_signal is None else torch.tensor(row_signal, device=DEVICE))


CASES = {  # Mamba2 state policy and conv window format
    "fp32/fp32": (StaticPolicy(F_("fp32")), "fp32", None),
    "int8/int8": (StaticPolicy(F_("int8")), "int8", None),
    "gsq-4bit/fp32": (StaticPolicy(F_("midrise4-e4m3-hadamard")), "fp32", None),  # e4m3: the pre-pass convs too
    "gate-int8-fp16/int4": (GateThresholdPolicy(F_("int8"), F_("fp16"), 0.3, "open"), "int4", None),
    "entropy-int4-fp16/fp32": (EntropyThresholdPolicy(F_("int4"), F_("fp16"), 0.5), "fp32", [0.2, 0.8]),
}


def unfused(case: dict, **options):
    """The same step with its conv launched first: conv_step, split into x, B, C, state_update."""
    conv = case["conv"]
    out, window = conv_step(conv)
    x, B, C = split_xBC(out, *case["low"].shape[1:])
    update = state_update(**(case | dict(x=x, B=B, C=C, conv=None)), **options)
    return update._replace(conv=window)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mamba2_step_with_its_conv_inside_matches_the_step_after_it(name):
    """Several programs per head (block_rows 2 of head_dim 3) and two heads per group: the B and C windows are
    written once, by the group's first program, and read by all."""
    policy, conv_fmt, row_signal = CASES[name]
    case = mamba2_case(policy, conv_fmt, row_signal=row_signal)
    fused = state_update(**case, block_rows=2)
    separate = unfused(case, block_rows=2)
    twin = state_update_reference(**case)
    assert_same_window(fused.conv, separate.conv)
    assert_same_window(fused.conv, twin.conv)
    assert torch.equal(fused.y, separate.y)  # the same conv code, then the same state code
    assert torch.equal(fused.low.data, separate.low.data)
    for scale in ("scale", "row_scale"):
        assert getattr(fused.low, scale) is None or torch.equal(getattr(fused.low, scale), getattr(separate.low, scale))
    if fused.high is not None:  # the high copies where valid (elsewhere the new tensor holds nothing)
        valid = fused.high_valid
        assert torch.equal(fused.high.data[valid], separate.high.data[valid])
    assert (fused.high_valid is None) == (twin.high_valid is None)
    if twin.high_valid is not None:  # the same decisions (the gate's up to ties at the threshold)
        assert torch.equal(fused.high_valid, separate.high_valid)
        decided = (twin.gate - policy.threshold).abs() > 1e-5 if isinstance(policy, GateThresholdPolicy) else ...
        assert torch.equal(fused.high_valid[decided], twin.high_valid[decided])
    torch.testing.assert_close(fused.y, twin.y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.gate, twin.gate, rtol=0, atol=1e-6)


def test_mamba2_conv_inside_in_place_and_taps():
    """inplace=True (a static cache's buffers) writes the state in place but the window to a new tensor; with
    zero B/C weights and biases (C = silu(0) = 0) and D = 1 the step's output is x, the conv of the x channels:
    one-hot taps pin its shift as in the conv kernel's test."""
    policy = StaticPolicy(F_("int8"))
    case = mamba2_case(policy, "fp32")
    conv = case["conv"]
    channels, d_inner = conv.weight.shape[0], 4 * 3
    for tap in range(K):
        weight = torch.zeros(channels, K, device=DEVICE)
        weight[:d_inner, tap] = 1.0
        bias = torch.zeros(channels, device=DEVICE)
        tapped = conv._replace(weight=weight, bias=bias)
        low = case["low"].map(torch.clone)
        update = state_update(**(case | dict(low=low, conv=tapped, D=torch.ones(4, device=DEVICE))), inplace=True,
                              block_rows=2)
        assert update.low is low and update.conv.data.data_ptr() != conv.window.data.data_ptr()
        full = torch.cat([conv.window.dequantize(), conv.u[..., None]], dim=-1)  # (batch, C, K + 1)
        assert torch.equal(update.conv.data, full[..., 1:])
        expected = F.silu(full[:, :d_inner, 1 + tap]).view(update.y.shape)
        torch.testing.assert_close(update.y, expected, rtol=1e-6, atol=1e-7)


def test_what_the_conv_kernel_cannot_store_is_named():
    conv = make_conv("fp32")
    assert conv_unsupported_reason(conv, "nearest") is None
    assert conv_unsupported_reason(None, "nearest").startswith("no stored conv window yet")
    for fmt in ("int4-e4m3", "int4-log8", "int8-hadamard", "levels5"):
        window = F_(fmt).quantize(torch.randn(3, 11, 16, device=DEVICE), 16)
        assert conv_unsupported_reason(conv._replace(window=window), "nearest").startswith(f"conv format {fmt}:")
    lossy = make_conv("int8")
    assert "stochastic rounding of a lossy conv window" in conv_unsupported_reason(lossy, "stochastic")
    assert conv_unsupported_reason(conv, "stochastic") is None  # fp32 stores the window exactly either way
    odd = conv._replace(window=F_("fp32").quantize(torch.randn(3, 11, 3, device=DEVICE), 3))
    assert conv_unsupported_reason(odd, "nearest") == "conv width 3: the conv kernel needs a power of two"
    wide = conv._replace(u=conv.u.double())
    assert "fp32, bf16 and fp16" in conv_unsupported_reason(wide, "nearest")
    with pytest.raises(NotImplementedError, match="conv format int4-e4m3"):
        conv_step(conv._replace(window=F_("int4-e4m3").quantize(torch.randn(3, 11, 4, device=DEVICE), 4)))


def test_conv_inside_the_state_update_is_mamba2s_only():
    case = mamba2_case(StaticPolicy(F_("int8")), "fp32")
    with pytest.raises(ValueError, match="pass x, B and C as None"):
        state_update(**(case | dict(x=torch.zeros(2, 4, 3, device=DEVICE))))
    mamba1 = StaticPolicy(F_("int8")).low.quantize(torch.randn(2, 11, 8, device=DEVICE), 8)
    with pytest.raises(ValueError, match="conv= is Mamba2's"):
        state_update(mamba1, None, None, None, torch.rand(2, 11, device=DEVICE), -torch.rand(11, 8, device=DEVICE),
                     None, None, policy=StaticPolicy(F_("int8")), conv=make_conv("fp32", 2, 11))
    with pytest.raises(ValueError, match="is not x"):
        state_update(**(case | dict(conv=make_conv("fp32", 2, 4 * 3 + 5))))

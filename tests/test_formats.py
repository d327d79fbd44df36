import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gsq_hf.errors import GSQConfigError
from gsq_hf.formats import _NOBLE_STEPS, FORMATS, QuasiRandom, get_format, mix32, rotate, rotate_rows

ROUNDINGS = st.sampled_from(["nearest", "stochastic", "quasirandom"])


def _bound(name: str, x: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """Documented per-element error bound: half a step for round-to-nearest, one step for stochastic.

    int formats: a step is the group's absmax / max_code. Float formats: a step is one ulp at |x|
    (relative 2**-mantissa_bits), never below the subnormal spacing 2**(min_exponent - mantissa_bits),
    in units of the group scale for fp8.
    """
    fmt = FORMATS[name]
    factor = 1.0 if stochastic else 0.5
    if name == "fp32":
        return torch.zeros_like(x)
    absmax = x.abs().amax(-1, keepdim=True)
    if fmt.kind == "int":
        return factor * (absmax / fmt.max_code).expand_as(x) * 1.0001
    unit = absmax / fmt.max_code if fmt.scaled else torch.ones_like(absmax)
    ulp = torch.maximum(x.abs() * 2.0**-fmt.mantissa_bits, unit * 2.0 ** (fmt.min_exponent - fmt.mantissa_bits))
    return factor * ulp * 1.0001


arrays = st.builds(
    lambda seed, scale, groups: torch.randn(3, groups, 16, generator=torch.Generator().manual_seed(seed)) * scale,
    st.integers(0, 2**31 - 1),
    st.sampled_from([1e-6, 1e-3, 1.0, 37.0, 1e3]),
    st.integers(1, 4),
)



@settings(max_examples=60, deadline=None)
@given(x=arrays, name=st.sampled_from(sorted(FORMATS)), rounding=ROUNDINGS)
def test_roundtrip_error_within_documented_bound(x, name, rounding):
    fmt = FORMATS[name]
    source = QuasiRandom(1, 3) if rounding == "quasirandom" else torch.Generator().manual_seed(1)
    y = fmt.roundtrip(x, 16, rounding, source)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.all((y - x).abs() <= _bound(name, x, rounding != "nearest") + 1e-30)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_storage_is_really_that_small(name):
    fmt = FORMATS[name]
    x = torch.randn(2, 5, 16)
    q = fmt.quantize(x, group_size=8)
    assert q.data.dtype == fmt.storage_dtype
    assert q.nbytes == fmt.nbytes(x.numel(), 8)
    if name == "int4":
        assert q.data.dtype == torch.uint8 and q.data.shape == (2, 5, 8)
    assert (q.scale is not None) == fmt.scaled


@pytest.mark.parametrize(("name", "stored"), [("int7", 14), ("int6", 12), ("int5", 10), ("int4", 8), ("int3", 6),
                                              ("int2", 4)])
def test_sub_byte_formats_pack_every_code_exactly(name, stored):
    """Every code at every position of a packed block survives the round trip; storage is bits/8 per value."""
    fmt = FORMATS[name]
    codes = torch.arange(-int(fmt.max_code), int(fmt.max_code) + 1)
    x = codes[torch.randperm(len(codes) * 16, generator=torch.Generator().manual_seed(0)) % len(codes)]
    x = x.float().view(-1, 16)
    x[:, 0] = fmt.max_code  # every row's scale is exactly 1
    q = fmt.quantize(x, group_size=16)
    assert q.data.shape == (x.shape[0], stored) and q.shape == tuple(x.shape)
    assert torch.equal(q.dequantize(), x)


def test_int3_packing_layout():
    fmt = FORMATS["int3"]
    x = torch.tensor([[3.0, -3.0, 0.0, 1.0, 2.0, -1.0, -2.0, 3.0]])
    q = fmt.quantize(x, group_size=8)
    # codes + 4: [7, 1, 4, 5, 6, 3, 2, 7], code i at bit 3i of a little-endian 24-bit word
    word = sum(c << (3 * i) for i, c in enumerate([7, 1, 4, 5, 6, 3, 2, 7]))
    assert q.data.tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_int4_packing_layout():
    fmt = FORMATS["int4"]
    x = torch.tensor([[7.0, -7.0, 1.0, 0.0]])
    q = fmt.quantize(x, group_size=4)
    # codes +8: [15, 1, 9, 8] -> bytes (1 << 4 | 15), (8 << 4 | 9)
    assert q.data.tolist() == [[(1 << 4) | 15, (8 << 4) | 9]]
    assert torch.equal(q.dequantize(), x)


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp8", "int8", "int4", "int3", "int2"])
def test_stochastic_rounding_is_unbiased_and_reproducible(name):
    fmt = FORMATS[name]
    x = torch.full((20000, 16), 0.3)
    x[:, 0] = 1.0  # fixes the scale of each group
    a = fmt.roundtrip(x, 16, "stochastic", torch.Generator().manual_seed(5))
    b = fmt.roundtrip(x, 16, "stochastic", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    nearest = fmt.roundtrip(x, 16, "nearest")[0, 1].item()
    assert nearest != pytest.approx(0.3, abs=1e-9) or name in ("fp16",)
    assert a[:, 1].mean().item() == pytest.approx(0.3, abs=2e-3)


def _mix32_reference(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_quasirandom_thresholds():
    """24-bit fractions in [0, 1), a function of (seed, step, stream) only (an int step and a device-scalar one
    agree, also past 2**32), different across steps, streams and seeds; the hash is lowbias32, bit for bit."""
    values = torch.randint(0, 2**32, (500,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    assert mix32(values).tolist() == [_mix32_reference(v) for v in values.tolist()]
    u = QuasiRandom(7, 5).uniform((3, 4, 16), "cpu")
    assert u.dtype == torch.float32 and ((u >= 0) & (u < 1)).all()
    assert torch.equal(u * 2**24, (u * 2**24).round())
    assert torch.equal(u, QuasiRandom(7, torch.tensor(5)).uniform((3, 4, 16), "cpu"))
    assert torch.equal(QuasiRandom(7, 5 + 2**32).uniform((8,), "cpu"), QuasiRandom(7, torch.tensor(5 + 2**32)).uniform(
        (8,), "cpu"))
    for other in (QuasiRandom(7, 6), QuasiRandom(8, 5), QuasiRandom(7, 5, stream=1)):
        assert (other.uniform((3, 4, 16), "cpu") != u).float().mean() > 0.9
    # the same in every batch row (dim 0), different within one
    assert torch.equal(u[0], u[2]) and (u[0, :, :8] != u[0, :, 8:]).float().mean() > 0.9
    # one write moves each threshold by its element's Weyl step (mod 1): one of the noble steps, many in use
    shape = (4, 32, 16)
    moved = (QuasiRandom(7, 6).uniform(shape, "cpu") - QuasiRandom(7, 5).uniform(shape, "cpu")) % 1.0
    steps = torch.tensor(_NOBLE_STEPS, dtype=torch.float64) / 2**32
    distance, which = (moved.double().flatten()[:, None] - steps).abs().min(dim=1)
    assert (distance <= 2**-23).all() and which.unique().numel() > 200  # of 256, over 512 elements


@pytest.mark.parametrize("name", ["midrise3-e4m3-hadamard", "int4", "fp8"])
def test_quasirandom_rounding_is_batch_invariant(name):
    """A sequence is stored the same alone and in any batch row: quasi-random thresholds index within the row."""
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    fmt, source = get_format(name), QuasiRandom(5, 11)
    batched = fmt.quantize(x, 16, "quasirandom", source).dequantize()
    for row in range(3):
        assert torch.equal(batched[row], fmt.quantize(x[row:row + 1], 16, "quasirandom", source).dequantize()[0])
    # while stochastic rounding's draws differ by position
    draw = fmt.quantize(x[[0, 0]], 16, "stochastic", torch.Generator().manual_seed(1)).dequantize()
    assert not torch.equal(draw[0], draw[1])


def _continued_fraction(x: float, terms: int) -> list[int]:
    out = []
    for _ in range(terms):
        x = 1 / x
        out.append(int(x))
        x -= int(x)
    return out


def test_noble_steps_are_distinct_and_end_in_ones():
    """256 distinct steps [0; a1, a2, a3, a4, 1, 1, ...] with a1..a4 in 1..4: every prefix once, then ones (as
    far as 32 bits resolve them), so each element's thresholds are as evenly spread over time as the golden
    ratio's."""
    expansions = [_continued_fraction(step / 2**32, 10) for step in _NOBLE_STEPS]
    assert len(set(_NOBLE_STEPS)) == 256
    assert sorted(tuple(e[:4]) for e in expansions) == sorted(itertools.product(range(1, 5), repeat=4))
    assert all(e[4:] == [1] * 6 for e in expansions)


def test_quasirandom_rounding_keeps_a_steady_move_within_a_step():
    """The point of quasi-random thresholds: a value re-stored after every small move (0.23 of a step here, as a
    decaying state moves) is kept within two steps of the true sum, where round-to-nearest drops every move
    and stochastic rounding's independent draws let the error grow like a random walk."""
    fmt, writes, move = FORMATS["int8"], 400, 0.23
    errors = {}
    for rounding in ("nearest", "stochastic", "quasirandom"):
        generator = torch.Generator().manual_seed(0)
        codes = torch.zeros(64, 16)
        for step in range(writes):
            source = QuasiRandom(3, step) if rounding == "quasirandom" else generator
            codes = fmt._codes(codes + move, rounding, source).float()  # scale 1: codes are values
        errors[rounding] = codes - writes * move
    assert (errors["nearest"] == -writes * move).all()
    assert errors["quasirandom"].abs().max() <= 2 and errors["quasirandom"].mean().abs() < 0.2
    assert errors["stochastic"].std() > 4  # sqrt(400 · 0.23 · 0.77) ≈ 8.4
    assert errors["stochastic"].mean().abs() < 1.5


def test_zero_and_fp16_saturation():
    assert torch.equal(FORMATS["int8"].roundtrip(torch.zeros(2, 16), 16), torch.zeros(2, 16))
    big = torch.full((1, 2), 1e6)
    assert torch.isfinite(FORMATS["fp16"].roundtrip(big, 2)).all()


def test_unknown_format_lists_known():
    accepted = "accepted: <codes>.* with codes one of fp32, bf16, fp16, fp8, int8, int7, int6, int5, int4, int3, int2, "
    for bad in ("int9", "int4-e5m2", "bf16-e4m3", "int4-hadamard-e4m3"):
        with pytest.raises(GSQConfigError, match=accepted):
            get_format(bad)
    with pytest.raises(GSQConfigError, match="'int4-fp32' is spelled 'int4'"):
        get_format("int4-fp32")
    assert get_format(torch.bfloat16).name == "bf16"


# -- composed formats: mid-rise codes, stored scales, rotation -------------------------------------------------
COMPOSED = [f"{codes}{scale}{rotation}" for codes in ("int8", "int4", "int3", "midrise4", "midrise3", "midrise2")
            for scale in ("", "-fp16", "-e4m3", "-e4m3up", "-log8", "-e8m0") for rotation in ("", "-hadamard")]


def _scale_error(fmt, scale: torch.Tensor) -> torch.Tensor:
    """Largest |stored − exact| of a group scale: fp16 and e4m3 round to nearest (e4m3 against the row's largest
    scale / 448, subnormals included), e8m0 rounds up to a power of two (below 2x), log8 to the nearest of 32
    steps per binade (half a step: a relative 2**(1/64) − 1) down to 2**(-254/32) of the row's largest scale."""
    if fmt.scale_dtype == "fp32":
        return torch.zeros_like(scale)
    if fmt.scale_dtype == "fp16":
        return scale * 2.0**-11 + 2.0**-25
    if fmt.scale_dtype == "e8m0":
        return scale
    row = scale.flatten(1).amax(1).view(-1, *[1] * (scale.dim() - 1)) / 448
    if fmt.scale_dtype == "log8":
        return torch.maximum(scale * (2.0 ** (1 / 64) - 1), row * 448 * 2.0 ** (-254 / 32))
    if fmt.scale_dtype == "e4m3up":  # one e4m3 step up at most: a relative 2**-3, or a subnormal step
        return torch.maximum(scale * 2.0**-3, row * 2.0**-9)
    return torch.maximum(scale * 2.0**-4, row * 2.0**-10)


@settings(max_examples=80, deadline=None)
@given(x=arrays, name=st.sampled_from(COMPOSED), rounding=ROUNDINGS)
def test_composed_roundtrip_error_within_bound(x, name, rounding):
    """Per element, in the (rotated) coordinates that are rounded: the nearest level (or a stochastic neighbour)
    of the stored scale's grid, plus what clamping to the grid costs when the stored scale is smaller; the
    rotation is orthogonal, so the error's norm per row is the same in both coordinates."""
    fmt = get_format(name)
    source = QuasiRandom(1, 3) if rounding == "quasirandom" else torch.Generator().manual_seed(1)
    y = fmt.roundtrip(x, 16, rounding, source)
    rotated = x @ _rotation(fmt, 16)
    scale = rotated.abs().amax(-1, keepdim=True) / fmt.max_code
    delta = _scale_error(fmt, scale)
    per_element = (0.5 if rounding == "nearest" else 1.0) * (scale + delta) + fmt.max_code * delta
    if fmt.rotation:  # every element of the row at its bound
        assert torch.all((y - x).norm(dim=-1) <= (per_element.square().sum(-1) * 16).sqrt() * 1.001 + 1e-30)
    else:
        assert torch.all((y - x).abs() <= per_element * 1.001 + 1e-30)


def _rotation(fmt, n: int) -> torch.Tensor:
    from gsq_hf.formats import _hadamard

    return _hadamard(n, torch.device("cpu")) if fmt.rotation else torch.eye(n)


@pytest.mark.parametrize("n", [2, 4, 16, 64, 128])
def test_hadamard_rotation_is_orthogonal_and_spreads_outliers(n):
    m = _rotation(get_format("fp32-hadamard"), n)
    torch.testing.assert_close(m @ m.T, torch.eye(n), atol=1e-6, rtol=0)
    spike = torch.zeros(1, n)
    spike[0, n - 1] = 1.0
    assert torch.allclose((spike @ m).abs(), torch.full((1, n), n**-0.5))  # one outlier spread over the row
    x = torch.randn(5, 7, n, dtype=torch.float64).float()
    torch.testing.assert_close(get_format("fp32-hadamard").roundtrip(x, n), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 16, 128])
def test_rotate_rows_is_the_rotation_with_bits_independent_of_the_other_rows(n):
    """`rotate_rows` (B and C of a Mamba2 state kept rotated) is ``x @ M`` up to float rounding, and a row's bits do
    not depend on the rows beside it: a decode step, a chunked scan and a replay rotate one token alike."""
    x = torch.randn(2, 37, 3, n, generator=torch.Generator().manual_seed(0))
    m = _rotation(get_format("fp32-hadamard"), n)
    whole = rotate_rows(x)
    torch.testing.assert_close(whole, x @ m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate(x), x @ m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate(whole, inverse=True), x, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(rotate_rows(x[:, start:start + 5]), whole[:, start:start + 5]) for start in range(0, 37, 5))
    assert torch.equal(rotate_rows(x[1, 7, 2]), whole[1, 7, 2])


@pytest.mark.parametrize("name", ["midrise4-e4m3-hadamard", "fp32-hadamard", "int8", "fp16"])
def test_a_state_given_in_the_rotated_basis_is_stored_alike(name):
    """``quantize(x @ M, rotated=True)`` stores what ``quantize(x)`` stores (a rotated format skips its rotation,
    another one undoes it; values equal but at rounding ties), and ``dequantize(rotated=True)`` reads ``x @ M``."""
    fmt, n = get_format(name), 16
    x = torch.randn(4, 6, n, generator=torch.Generator().manual_seed(1))
    m = _rotation(get_format("fp32-hadamard"), n)
    plain = fmt.quantize(x, 8).dequantize()
    given_rotated = fmt.quantize(x @ m, 8, rotated=True).dequantize()
    assert ((given_rotated - plain).abs() > 1e-5 * (1 + plain.abs())).float().mean() <= 0.01
    torch.testing.assert_close(fmt.quantize(x, 8).dequantize(rotated=True), plain @ m, atol=1e-5, rtol=1e-5)
    wrong_side = fmt.quantize(x @ m.T, 8, rotated=True).dequantize()  # Mᵀ where M belongs: another state
    assert (wrong_side - plain).abs().max() > 0.1


def test_midrise_has_two_to_the_bits_levels_and_no_zero():
    fmt = get_format("midrise3")
    x = torch.linspace(-1, 1, 801).view(-1, 1).expand(-1, 8).contiguous()
    x[:, 0] = 1.0  # every row's scale: 1 / 3.5
    levels = torch.unique(fmt.roundtrip(x, 8)[:, 1:] * 3.5)
    assert levels.tolist() == pytest.approx([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5])
    assert fmt.bits_per_element(8) == 3 + 32 / 8 and get_format("int3").max_code == 3  # int3: 7 levels


@pytest.mark.parametrize(("name", "bits"), [("int4-e4m3", 4.5), ("midrise3-e4m3-hadamard", 3.5), ("int4-e8m0", 4.5),
                                            ("midrise4-log8-hadamard", 4.5),
                                            ("int4-fp16", 5.0), ("int8", 10.0), ("midrise2-e8m0", 2.5)])
def test_exact_bit_accounting(name, bits):
    """Bits per element at d_state 16: payload + scale bits / 16; e4m3 adds one fp32 per batch row, counted
    where it is allocated (QuantizedTensor.nbytes) and per write (the cache's memory report)."""
    fmt = get_format(name)
    x = torch.randn(3, 24, 16)
    q = fmt.quantize(x, 16)
    assert fmt.bits_per_element(16) == bits
    assert q.nbytes == fmt.nbytes(x.numel(), 16) + 3 * fmt.row_bytes == x.numel() * bits / 8 + 3 * fmt.row_bytes
    assert (q.row_scale is not None) == (fmt.row_bytes == 4) and q.data.dtype == fmt.storage_dtype


def test_format_by_parts_is_the_canonical_name():
    assert get_format({"codes": "midrise3", "scale": "e4m3", "rotation": "hadamard"}).name == "midrise3-e4m3-hadamard"
    assert get_format({"codes": "int4"}) is get_format("int4")
    with pytest.raises(GSQConfigError, match="GSQConfig.group_size"):
        get_format({"codes": "int4", "group": 16})


@pytest.mark.parametrize("name", ["int8", "int4", "int3", "midrise3-e4m3-hadamard", "midrise4-e4m3-hadamard", "fp8",
                                  "int5-e8m0", "fp16"])
def test_a_state_laid_out_state_dim_outer_is_stored_alike_and_keeps_its_layout(name):
    """The CPU Mamba path hands states whose last dim (d_state) is not innermost: same codes, scales and values
    as the contiguous state, and the stored and read-back tensors keep the channel dim innermost."""
    fmt = get_format(name)
    outer = torch.randn(3, 16, 24).transpose(1, 2)  # (batch, channels, d_state), channels innermost
    stored, reference = fmt.quantize(outer, 8), fmt.quantize(outer.contiguous(), 8)
    assert torch.equal(stored.data, reference.data)
    assert (stored.scale is None) == (reference.scale is None)
    if stored.scale is not None:
        assert torch.equal(stored.scale, reference.scale)
    assert torch.equal(stored.dequantize(), reference.dequantize())
    assert stored.data.stride(1) == 1 and stored.dequantize().stride(1) == 1
    assert stored.nbytes == reference.nbytes


@pytest.mark.parametrize("name", ["midrise3-e8m0", "midrise4-e8m0", "int4-e8m0", "midrise3-e4m3", "midrise3-log8",
                                  "midrise3"])
def test_an_all_zero_group_reads_back_as_zero_or_the_smallest_level(name):
    """Mid-rise grids have no zero level: a zero group must read back at the scale's smallest value, not ±0.5."""
    x = torch.zeros(2, 3, 16)
    x[1] = torch.randn(3, 16)
    back = get_format(name).roundtrip(x, 8)
    assert back[0].abs().max() <= 2.0**-128


@pytest.mark.parametrize("codes", ["int4", "midrise4", "midrise3"])
def test_e4m3up_scales_are_never_below_the_exact_scale_so_nothing_is_clamped(codes):
    """e4m3 rounds a group scale to nearest, so about half the groups store a smaller scale and their largest
    values are clamped to the top level; e4m3up rounds up: every stored scale is at least the exact one (at most
    one e4m3 step above it) and every value is within half a step of its code, clamping included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 16, generator=gen) * torch.rand(4, 64, 1, generator=gen) * 10
    exact = x.abs().amax(-1) / get_format(codes).max_code
    step = torch.maximum(exact * 2.0**-3, exact.amax(-1, keepdim=True) / 448 * 2.0**-9)  # one e4m3 step, subnormals
    up, nearest = get_format(f"{codes}-e4m3up"), get_format(f"{codes}-e4m3")
    stored_up = up._load_scale(up.quantize(x, 16)).squeeze(-1)
    stored_nearest = nearest._load_scale(nearest.quantize(x, 16)).squeeze(-1)
    assert torch.all(stored_up >= exact) and torch.all(stored_up <= (exact + step) * 1.0001)
    assert (stored_nearest < exact).float().mean() > 0.2  # what e4m3up avoids
    assert torch.all((up.roundtrip(x, 16) - x).abs() <= 0.5 * stored_up.unsqueeze(-1) * 1.0001)
    assert up.bits_per_element(16) == nearest.bits_per_element(16) and up.row_bytes == 4


HELD = ["int4", "int4-e8m0", "int4-fp16", "midrise4-e4m3", "midrise4-e4m3up-hadamard", "midrise3-e4m3-hadamard",
        "midrise4-log8-hadamard"]


def _state(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-2, 1, 6)[:, None]


@pytest.mark.parametrize("name", HELD)
def test_held_scales_keep_the_codes_of_values_that_did_not_move(name):
    """The state re-stored unchanged except for the row's largest group shrinking a little: with held scales every
    other group keeps its stored value bit for bit; with fresh scales an e4m3 row scale moves them all."""
    fmt = get_format(name)
    first = fmt.quantize(_state(), 16)
    read = first.dequantize()
    moved = read.clone()
    moved[:, -1] *= 0.97  # the largest unit: it holds each batch row's largest group
    held = fmt.quantize(moved, 16, previous=first, hold=0.5)
    assert torch.equal(held.dequantize()[:, :-1], read[:, :-1])
    assert torch.equal(fmt._load_scale(held), fmt._load_scale(first))  # 0.97 >= hold: the last groups kept too
    if fmt.row_bytes:  # e4m3 / log8: a fresh row scale moves them
        assert not torch.equal(fmt.quantize(moved, 16).dequantize()[:, :-1], read[:, :-1])


@pytest.mark.parametrize("name", HELD)
@pytest.mark.parametrize("factor", [2.0, 0.2])
def test_held_scales_refresh_where_a_group_grew_or_shrank_past_the_hold(name, factor):
    """A group that outgrew its scale (would clamp) or fell below ``hold`` of it gets the fresh scale: every group
    moving so equals storing without a previous value, bit for bit."""
    fmt = get_format(name)
    first = fmt.quantize(_state(), 16)
    moved = first.dequantize() * factor
    held = fmt.quantize(moved, 16, previous=first, hold=0.5)
    fresh = fmt.quantize(moved, 16)
    assert torch.equal(held.data, fresh.data) and torch.equal(held.scale, fresh.scale)


@pytest.mark.parametrize("name", HELD)
def test_held_scales_clamp_nothing(name):
    """Random moves under a held scale: the round-to-nearest error stays within half a (held) step, as without."""
    fmt = get_format(name)
    previous = fmt.quantize(_state(), 16)
    for seed in range(1, 6):
        x = previous.dequantize() * (0.8 + 0.2 * torch.rand(2, 6, 1, generator=torch.Generator().manual_seed(seed)))
        x = x + 0.01 * _state(seed)
        q = fmt.quantize(x, 16, previous=previous, hold=0.7)
        step = fmt._load_scale(q).repeat_interleave(16, dim=-1)
        error = q.dequantize() - x
        if fmt.rotation is not None:  # the error bound holds in the rotated basis, where the codes are
            from gsq_hf.formats import _hadamard, _rotate
            error = _rotate(error, _hadamard(32, x.device))
        assert bool((error.abs() <= 0.5 * step * 1.0001 + 1e-7).all()), seed
        previous = q


def test_held_scales_never_hold_a_non_finite_group():
    fmt = get_format("midrise4-e4m3")
    first = fmt.quantize(_state(), 16)
    x = first.dequantize()
    x[0, 2, 3] = float("nan")
    held = fmt.quantize(x, 16, previous=first, hold=0.5)
    assert torch.isnan(held.dequantize()[0, 2, :16]).all() and not torch.isnan(held.dequantize()[1]).any()


def test_log8_scales_are_32_steps_per_binade_of_the_row_scale():
    """A log8 group scale is 2**(-k/32) of its batch row's largest group scale (stored once per row in fp32), the
    nearest such step in log space (within a relative 2**(1/64) − 1: 1.1%, where e4m3's is up to 6.25%); groups
    more than 2**(254/32) below the row's largest take that floor, an all-zero group code 255 (scale 0); the
    codes are uint8, 8 bits a group, and a group halved moves 32 codes down."""
    fmt = get_format("midrise4-log8")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 16, generator=gen) * torch.logspace(-4, 1, 40)[:, None]
    x[:, 39] *= 10  # each row's largest group
    x[2, 5] = 0
    q = fmt.quantize(x, 16)
    exact = x.abs().amax(-1, keepdim=True) / fmt.max_code
    row = exact.flatten(1).amax(1)
    stored = fmt._load_scale(q)
    assert q.scale.dtype == torch.uint8 and torch.equal(q.row_scale, row)
    k = q.scale.long().squeeze(-1)
    assert torch.allclose(stored.squeeze(-1), torch.where(k == 255, 0.0, row[:, None] * 2.0 ** (-k / 32.0)))
    in_range = exact.squeeze(-1) >= row[:, None] * 2.0 ** (-254 / 32)
    ratio = stored.squeeze(-1)[in_range] / exact.squeeze(-1)[in_range]
    assert ratio.max() <= 2.0 ** (1 / 64) * 1.0001 and ratio.min() >= 2.0 ** (-1 / 64) / 1.0001
    assert torch.all(k[~in_range & (exact.squeeze(-1) > 0)] == 254) and k[2, 5] == 255
    assert fmt.roundtrip(x, 16)[2, 5].abs().max() == 0
    shifted = x.clone()
    shifted[:, 20:39] *= 0.5  # groups other than the row's largest: one binade, 32 steps, down
    moved = k[:, 20:39] < 254 - 32
    assert moved.sum() >= 20 and torch.equal(fmt.quantize(shifted, 16).scale.long().squeeze(-1)[:, 20:39][moved],
                                             k[:, 20:39][moved] + 32)
    assert fmt.bits_per_element(16) == 4.5 and fmt.row_bytes == 4



@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_a_model_stores_log8_scales_and_counts_their_bits(family):
    """End to end at d_state 16: uint8 group scales, 4.5 bits per element plus the fp32 row scales in the memory
    report (the fused kernel's log8 is checked against its twin in tests/kernels)."""
    import gsq_hf
    from tests.models import FAMILIES

    out = gsq_hf.patch(FAMILIES[family](state_size=16), {"policy": "static", "format": "midrise4-log8-hadamard"}
                       ).generate(torch.randint(2, 64, (2, 5)), max_new_tokens=3, do_sample=False,
                                  return_dict_in_generate=True, output_logits=True)
    assert torch.isfinite(torch.stack(out.logits)).all()
    assert out.past_key_values.gsq_layers[0].storage.low.scale.dtype == torch.uint8
    assert 4.5 < out.past_key_values.memory_report()["avg_state_bits"] < 4.6

import importlib.util

import pytest
import torch

from gsq_hf import packing
from gsq_hf.formats import get_format

LEVELS = ["levels5", "levels11"]


@pytest.mark.parametrize("name", LEVELS)
def test_every_code_of_a_levels_grid_packs_and_unpacks_exactly(name):
    fmt = get_format(name)
    top = (fmt.levels - 1) // 2
    codes = torch.randint(-top, top + 1, (4, 6, 32), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    extremes = torch.tensor([[-top] * 16, [top] * 16, [top, -top] * 8], dtype=torch.int8)  # the int64's range ends
    for c in (codes, extremes):
        data = packing.pack(fmt, c)
        assert data.dtype == torch.uint8 and data.shape[-1] == c.shape[-1] // 16 * packing.block(fmt)[1]
        assert torch.equal(packing.unpack(fmt, data), c)


def test_levels5_block_layout_is_a_little_endian_base5_number():
    fmt = get_format("levels5")
    codes = torch.full((1, 16), -2, dtype=torch.int8)  # every digit 0
    codes[0, 1] = -1  # digit 1 at position 1: 5
    codes[0, 15] = 2  # digit 4 at position 15: 4 * 5**15
    number = 5 + 4 * 5**15
    assert packing.pack(fmt, codes)[0].tolist() == [(number >> (8 * k)) & 0xFF for k in range(5)]


def test_only_levels5_and_levels11_pack_more_levels_than_any_grid_of_their_bits():
    """For every L up to 15, the bits a 16-code block of L levels takes: 5 and 11 are the largest level counts at
    2.5 and 3.5 bits; every other L fits into the bits of a power-of-two grid with as many levels or more
    (3, 6, 7, 12-15) or into the bytes of levels5/levels11 with fewer levels (9, 10)."""
    best: dict[float, int] = {}
    for levels in range(3, 16):
        if levels & (levels - 1):
            bits = packing._levels_bytes(levels) * 8 / 16
            best[bits] = max(best.get(bits, 0), levels)
    beyond_power_of_two = {bits: levels for bits, levels in best.items() if levels > 2 ** int(bits)}
    assert beyond_power_of_two == {2.5: 5, 3.5: 11}
    assert get_format("levels5").bits == 2.5 and get_format("levels11").bits == 3.5


@pytest.mark.parametrize(("name", "bits"), [("levels5-e4m3-hadamard", 3.0), ("levels11-e4m3", 4.0),
                                            ("levels5", 4.5), ("levels11-e8m0-hadamard", 4.0)])
def test_levels_formats_count_every_stored_bit(name, bits):
    fmt = get_format(name)
    x = torch.randn(3, 24, 16)
    q = fmt.quantize(x, 16)
    assert fmt.bits_per_element(16) == bits
    assert q.nbytes == x.numel() * bits / 8 + 3 * fmt.row_bytes


@pytest.mark.parametrize("name", LEVELS)
def test_levels_grid_has_its_levels_and_a_zero(name):
    fmt = get_format(name)
    top = (fmt.levels - 1) // 2
    x = torch.linspace(-1, 1, 801).view(-1, 1).expand(-1, 16).contiguous()
    x[:, 0] = 1.0  # every row's scale: 1 / top
    levels = torch.unique(torch.round(fmt.roundtrip(x, 16)[:, 1:] * top * 1e4) / 1e4)
    assert levels.tolist() == list(range(-top, top + 1))


@pytest.mark.parametrize("name", ["levels5-e4m3-hadamard", "levels11"])
def test_a_state_dim_outer_state_packs_alike_and_keeps_its_layout(name):
    fmt = get_format(name)
    outer = torch.randn(3, 32, 24).transpose(1, 2)  # (batch, channels, d_state), channels innermost
    stored, reference = fmt.quantize(outer, 16), fmt.quantize(outer.contiguous(), 16)
    assert torch.equal(stored.data, reference.data)
    assert torch.equal(stored.dequantize(), reference.dequantize())
    assert stored.data.stride(1) == 1 and stored.dequantize().stride(1) == 1


def test_stochastic_rounding_on_a_levels_grid_is_unbiased():
    fmt = get_format("levels5")
    x = torch.rand(1, 16) * 2 - 1
    x[0, 0] = 1.0
    gen = torch.Generator().manual_seed(3)
    mean = torch.stack([fmt.roundtrip(x, 16, "stochastic", gen) for _ in range(4000)]).mean(0)
    step = 1.0 / 2  # absmax 1 over 2 levels each side
    assert torch.all((mean - x).abs() < 4 * step * 0.5 / 4000**0.5)


def test_the_kernel_leaves_levels_grids_to_the_torch_step():
    from gsq_hf.kernels.reference import KERNEL_FORMATS

    assert "levels5-e4m3-hadamard" not in KERNEL_FORMATS and "midrise3-e4m3-hadamard" in KERNEL_FORMATS


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_a_model_stores_levels_codes_and_counts_their_bits(family):
    """End to end at d_state 16: generation runs on the torch step (the kernel names the format it does not
    store), and the memory report counts 3.0 bits per element plus e4m3's fp32 row scales."""
    import gsq_hf
    from tests.models import FAMILIES

    model = gsq_hf.patch(FAMILIES[family](state_size=16), {"policy": "static", "format": "levels5-e4m3-hadamard"})
    out = model.generate(torch.randint(2, 64, (2, 5)), max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    assert torch.isfinite(torch.stack(out.logits)).all()
    layer = out.past_key_values.gsq_layers[0]
    assert layer.storage.low.data.dtype == torch.uint8 and layer.storage.low.data.shape[-1] % 5 == 0
    assert 3.0 < out.past_key_values.memory_report()["avg_state_bits"] < 3.1
    if importlib.util.find_spec("triton") is not None:  # kernel forced (TRITON_INTERPRET on a CPU): still torch
        config = {"policy": "static", "format": "levels5-e4m3-hadamard", "kernel": "triton"}
        with gsq_hf.patched(FAMILIES[family](state_size=16), config) as forced:
            cache = forced(torch.randint(2, 64, (2, 4))).cache
            forced(torch.randint(2, 64, (2, 1)), cache=cache)
        assert "levels5-e4m3-hadamard" in cache.gsq_layers[0].kernel_reason

import torch

from gsq_hf.adapters.mamba import discretize


def test_discretize_is_upstreams_arithmetic_laid_out_state_dim_outer():
    """Ā and B̄x equal upstream's products bit for bit (Mamba: S = (D,); Zamba: S = (heads, head_dim)), with
    d_state outside the channel dims in memory on CPU (the fast layout for per-group absmax over d_state)."""
    torch.manual_seed(0)
    for units in ((12,), (3, 4)):
        dt, x = torch.rand(2, 5, *units), torch.randn(2, 5, *units)
        A, B = -torch.rand(*units, 8), torch.randn(2, 5, *units[:-1], 1, 8)
        dA, dBx = discretize(dt, A, B, x)
        assert torch.equal(dA, torch.exp(dt[..., None] * A))
        assert torch.equal(dBx, dt[..., None] * B * x[..., None])
        for t in (dA, dBx):
            assert t.stride(-1) == t[0, 0].numel() // 8 and t.movedim(-1, 2).is_contiguous()

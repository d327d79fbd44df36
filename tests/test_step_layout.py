import torch

from gsq_hf.step import discretize


def test_discretize_is_upstreams_arithmetic_laid_out_state_dim_outer_on_cpu():
    """Ā and B̄x equal upstream's products bit for bit (Mamba: S = (D,); Zamba: S = (heads, head_dim); a scan's
    leading dims (batch, T) and a step's (batch,)), with d_state outside the channel dims in memory on CPU (the
    fast layout for the per-group absmax over d_state)."""
    torch.manual_seed(0)
    for units in ((12,), (3, 4)):
        for lead in ((2, 5), (2,)):
            dt, x = torch.rand(*lead, *units), torch.randn(*lead, *units)
            A, B, C = -torch.rand(*units, 8), torch.randn(*lead, *units[:-1], 8), torch.randn(*lead, *units[:-1], 8)
            dA, dBx, _ = discretize(x, dt, A, B, C)
            assert torch.equal(dA, torch.exp(dt[..., None] * A))
            assert torch.equal(dBx, dt[..., None] * B[..., None, :] * x[..., None])
            for t in (dA, dBx):
                assert t.movedim(-1, len(lead)).is_contiguous() and not t.is_contiguous()


def test_mamba2_discretize_is_upstreams_arithmetic_laid_out_state_dim_outer_on_cpu():
    torch.manual_seed(0)
    for lead in ((2, 5), (2,)):
        x, dt, A = torch.randn(*lead, 4, 6), torch.rand(*lead, 4), -torch.rand(4)
        B, C = torch.randn(*lead, 2, 8), torch.randn(*lead, 2, 8)  # 2 groups of 2 heads
        dA, dBx, _ = discretize(x, dt, A, B, C)
        heads_B = B.repeat_interleave(2, dim=-2)
        assert torch.equal(dA, torch.exp(dt * A)[..., None, None])
        assert torch.equal(dBx, (dt[..., None] * x)[..., None] * heads_B[..., None, :])
        assert dBx.transpose(-1, -2).is_contiguous() and not dBx.is_contiguous()

"""Routed experts: the grouped product (CPU) equals one matmul per expert, values and gradients."""
import pytest
import torch

import dsv4
from dsv4.model.moe import MoE, grouped_linear


@pytest.mark.parametrize("dim", [6, 8])  # rows of 24 bytes: per-group matmuls; 32 bytes: torch._grouped_mm
def test_grouped_linear_op_registration(dim):
    """Fake (compile) and autograd registrations agree with the real kernel; an empty group included."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, dim, generator=g), torch.randn(3, dim, dim, generator=g)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    torch.library.opcheck(grouped_linear, (x.requires_grad_(), w.requires_grad_(), offs))
    want = torch.cat([x[:4] @ w[0].T, x[4:] @ w[2].T])
    assert torch.allclose(grouped_linear(x, w, offs), want, atol=1e-6)


def test_grouped_experts_equal_per_expert_matmuls():
    """Skewed routing (some experts get no token): outputs and all gradients equal the per-expert loop."""
    cfg = dsv4.Config.tiny()
    torch.manual_seed(0)
    moe = MoE(cfg, hash_layer=False)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.bias[:3] = 5.0  # most tokens go to experts 0-2
    x = torch.randn(2, 9, cfg.hidden_size, requires_grad=True)

    def run(path):
        moe.zero_grad()
        xx = x.detach().clone().requires_grad_()
        flat = xx.reshape(-1, cfg.hidden_size)
        g, idx = moe.gate(flat, None)
        order = idx.flatten().argsort(stable=True)
        load = torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)
        y = path(flat, order // idx.shape[1], g.flatten()[order], load)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [y, xx.grad] + [p.grad.clone() for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.gate.weight)]

    got, want = run(moe._grouped), run(moe._per_expert)
    assert (torch.bincount(moe.gate(x.reshape(-1, cfg.hidden_size), None)[1].flatten(), minlength=8) == 0).any()
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)

"""mHC pieces against the equations of architecture.md section 2."""
import torch

from dsv4.model.mhc import hc_head, hc_post, hc_pre, sinkhorn


def test_sinkhorn_numpy_and_torch_paths_agree_and_are_doubly_stochastic():
    logits = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = sinkhorn(logits, 20, 1e-6)  # NumPy path (inference)
    slow = sinkhorn(logits.clone().requires_grad_(), 20, 1e-6)  # torch path (autograd)
    assert torch.allclose(fast, slow.detach(), atol=1e-6)
    assert torch.allclose(fast.sum(-2), torch.ones(3, 5, 4), atol=1e-5)
    assert torch.allclose(fast.sum(-1), torch.ones(3, 5, 4), atol=1e-2)  # 20 iterations: approximately


def test_uniform_logits_give_uniform_mixing():
    c = sinkhorn(torch.zeros(4, 4), 20, 1e-6)
    assert torch.allclose(c, torch.full((4, 4), 0.25), atol=1e-5)


def test_hc_pre_post_hand_computed():
    """fn = 0 makes mu = 0: pre = sigmoid(base) + eps, post = 2 sigmoid(base), C = Sinkhorn(softmax(base))."""
    n, d = 4, 3
    X = torch.randn(1, 2, n, d)
    base = torch.zeros(24)
    base[:4] = torch.tensor([0.0, 1.0, -1.0, 2.0])
    h, post, C = hc_pre(X, torch.zeros(24, n * d), base, torch.ones(3), 1e-6, 1e-6, 20)
    pre = torch.sigmoid(base[:4]) + 1e-6
    assert torch.allclose(h, (pre[:, None] * X).sum(-2), atol=1e-6)
    assert torch.allclose(post, torch.full((1, 2, 4), 1.0))  # 2 * sigmoid(0)
    f = torch.randn(1, 2, d)
    out = hc_post(f, X, post, C)
    assert torch.allclose(out, f.unsqueeze(-2) + torch.einsum("bsjk,bsjd->bskd", C, X), atol=1e-6)
    y = hc_head(X, torch.zeros(4, n * d), base[:4], torch.ones(1), 1e-6, 1e-6)
    assert torch.allclose(y, (pre[:, None] * X).sum(-2), atol=1e-6)

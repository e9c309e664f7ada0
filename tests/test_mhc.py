"""mHC pieces against the equations of architecture.md section 2."""
import numpy as np
import torch

from dsv4.model.mhc import hc_head, hc_post, hc_pre, sinkhorn
from helpers import np_sinkhorn


def test_sinkhorn_numpy_and_torch_paths_agree_and_are_doubly_stochastic():
    logits = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = sinkhorn(logits, 20, 1e-6)  # NumPy path (inference)
    slow = sinkhorn(logits.clone().requires_grad_(), 20, 1e-6)  # torch path (autograd)
    assert torch.allclose(fast, slow.detach(), atol=1e-6)
    assert torch.allclose(fast.sum(-2), torch.ones(3, 5, 4), atol=1e-5)
    assert torch.allclose(fast.sum(-1), torch.ones(3, 5, 4), atol=1e-2)  # 20 iterations: approximately


def test_sinkhorn_gradient_equals_normalising_the_matrix_itself():
    """The torch path rescales row and column factors; its gradient is that of the definition's iterations
    (c / row sums, c / column sums), run here in float64 on a non-symmetric input."""
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = torch.arange(16.0, dtype=torch.float64).view(4, 4)

    def definition(z, iters=20, eps=1e-6):
        c = z.softmax(-1) + eps
        c = c / (c.sum(-2, keepdim=True) + eps)
        for _ in range(iters - 1):
            c = c / (c.sum(-1, keepdim=True) + eps)
            c = c / (c.sum(-2, keepdim=True) + eps)
        return c

    for iters in (3, 20):
        z1, z2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours, want = sinkhorn(z1, iters, 1e-6), definition(z2, iters)
        assert torch.allclose(ours, want, atol=1e-12)
        (ours * weights).sum().backward()
        (want * weights).sum().backward()
        assert z2.grad.abs().max() > (1e-3 if iters == 3 else 1e-9)  # converged: the gradient fades
        assert torch.allclose(z1.grad, z2.grad, rtol=1e-9, atol=1e-12)


def test_uniform_logits_give_uniform_mixing():
    c = sinkhorn(torch.zeros(4, 4), 20, 1e-6)
    assert torch.allclose(c, torch.full((4, 4), 0.25), atol=1e-5)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def mixing_inputs(X, fn, norm_eps):
    """mu = (fn @ x) * rho, x the token's n streams flattened stream-major, rho = 1/sqrt(mean(x^2) + eps)."""
    x = np.asarray(X, dtype=np.float64).reshape(*X.shape[:-2], -1)
    rho = 1 / np.sqrt((x ** 2).mean(-1, keepdims=True) + norm_eps)
    return (x @ np.asarray(fn, dtype=np.float64).T) * rho


def mhc_reference(X, fn, base, scale, norm_eps, hc_eps, iters):
    """architecture.md section 2 in float64 NumPy, per token: mu = (fn @ x) rho, pre, post, comb, Sinkhorn-Knopp
    (softmax over rows + eps, column normalisation, then iters - 1 row/column rounds), h = sum_j pre_j X_j."""
    X, base, scale = (np.asarray(t, dtype=np.float64) for t in (X, base, scale))
    n = X.shape[-2]
    mu = mixing_inputs(X, fn, norm_eps)
    pre = sigmoid(mu[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * sigmoid(mu[..., n:2 * n] * scale[1] + base[n:2 * n])
    C = np_sinkhorn(mu[..., 2 * n:].reshape(*mu.shape[:-1], n, n) * scale[2] + base[2 * n:].reshape(n, n), iters,
                    hc_eps)
    h = (pre[..., :, None] * X).sum(-2)
    return h, pre, post, C


def test_hc_pre_post_head_match_the_equations():
    """Non-zero fn (the RMS-scaled mixing inputs), scales != 1 and a non-symmetric comb base: pre, post,
    C = Sinkhorn(softmax(mu * scale + base)) and the outputs X_k = post_k f + sum_j C[j, k] X_j (row j the
    source stream, column k the destination) against a float64 transcription of section 2."""
    g = torch.Generator().manual_seed(0)
    B, S, n, d, eps = 2, 3, 4, 5, 1e-6
    X = torch.randn(B, S, n, d, generator=g)
    fn = 0.3 * torch.randn(24, n * d, generator=g)
    base = torch.randn(24, generator=g)
    base[8:] += torch.arange(16.0) / 4  # rows and columns differ: C is far from symmetric
    scale = torch.tensor([0.7, 1.3, 0.9])
    assert np.abs(mixing_inputs(X, fn, 1e-6)).max() > 1  # mu (hence fn, rho and scale) moves every output
    h, post, C = hc_pre(X, fn, base, scale, 1e-6, eps, 20)
    want_h, _, want_post, want_C = mhc_reference(X, fn, base, scale, 1e-6, eps, 20)
    assert np.abs(want_C - want_C.swapaxes(-1, -2)).max() > 0.1  # the test separates C from C^T
    assert np.abs(want_C.sum(-2) - 1).max() < 1e-5  # columns sum to 1 after the last normalisation
    assert torch.allclose(C, torch.from_numpy(want_C).float(), atol=1e-5)
    assert torch.allclose(post, torch.from_numpy(want_post).float(), atol=1e-5)
    assert torch.allclose(h, torch.from_numpy(want_h).float(), atol=1e-5)
    f = torch.randn(B, S, d, generator=g)
    out = hc_post(f, X, post, C)
    Xd, Cd = X.double().numpy(), want_C
    want_out = want_post[..., :, None] * f.double().numpy()[..., None, :]
    for k in range(n):
        for j in range(n):
            want_out[..., k, :] += Cd[..., j, k, None] * Xd[..., j, :]
    assert torch.allclose(out, torch.from_numpy(want_out).float(), atol=1e-5)
    # the head: pre = sigmoid(mu * scale + base) + eps over 4 outputs, no Sinkhorn, no post
    head_fn, head_base = 0.3 * torch.randn(n, n * d, generator=g), torch.randn(n, generator=g)
    y = hc_head(X, head_fn, head_base, torch.tensor([0.7]), 1e-6, eps)
    pre = sigmoid(mixing_inputs(X, head_fn, 1e-6) * 0.7 + head_base.double().numpy()) + eps
    want_y = (pre[..., :, None] * X.double().numpy()).sum(-2)
    assert torch.allclose(y, torch.from_numpy(want_y).float(), atol=1e-5)

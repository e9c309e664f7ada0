"""Manifold-constrained hyper-connections (architecture.md section 2).

The residual is n = hc_mult parallel streams X: [B, S, n, d]. Before each sub-layer,
HCPre computes per token pre (collapse), post (expand) and a doubly-stochastic mixing
matrix C (Sinkhorn-Knopp); after it, X_k <- post_k * f + sum_j C[j, k] X_j.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def hc_mix_inputs(X: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """mu = (fn @ flatten(X)) * rho, rho = 1/sqrt(mean(flatten(X)^2) + eps). X: [B,S,n,d] -> [B,S,fn.shape[0]] fp32.

    In that order: the product first, then the [B,S,1] scale (no scaled copy of X), and the mean square
    as one norm reduction (no squared copy)."""
    x = X.flatten(-2).float()
    ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]
    return F.linear(x, fn.float()) * torch.rsqrt(ms + eps)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """[..., n, n] -> approximately doubly-stochastic (rows: source stream j, columns: destination k)."""
    if logits.device.type == "cpu":
        if (torch.is_grad_enabled() and logits.requires_grad) or torch.compiler.is_compiling():
            return _sinkhorn_scaled(logits, iters, eps)
        return _sinkhorn_numpy(logits, iters, eps)
    c = logits.softmax(-1) + eps  # elsewhere (eager on a GPU) the fewest kernel launches
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def _sinkhorn_scaled(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The same iterations on c = a_j K_jk b_k: normalising rows rescales a, columns b, so each updates n
    numbers, not n x n. Compiled on the CPU (AOTInductor, 12 of them in a row on [1, 4, 4]): 60 us against
    235 us for normalising c itself; forward and backward on [8, 128, 4, 4]: 1.7x faster."""
    K = logits.softmax(-1) + eps
    a = torch.ones_like(K[..., 0])
    b = 1 / (K.sum(-2) + eps)  # the first column normalisation
    for _ in range(iters - 1):
        a = a / (a * (K * b[..., None, :]).sum(-1) + eps)
        b = b / (b * (K * a[..., :, None]).sum(-2) + eps)
    return a[..., :, None] * K * b[..., None, :]


def _sinkhorn_numpy(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The same iterations in NumPy: 40 tiny ops cost far less there than as torch dispatches (decode)."""
    c = logits.float().numpy()
    c = np.exp(c - c.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + np.float32(eps)
    c /= c.sum(-2, keepdims=True) + np.float32(eps)
    for _ in range(iters - 1):
        c /= c.sum(-1, keepdims=True) + np.float32(eps)
        c /= c.sum(-2, keepdims=True) + np.float32(eps)
    return torch.from_numpy(c)


def hc_pre(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
           hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X: [B,S,n,d] -> h [B,S,d] (X's dtype), post [B,S,n] fp32, C [B,S,n,n] fp32."""
    n = X.shape[-2]
    mu = hc_mix_inputs(X, fn, norm_eps)
    base, scale = base.float(), scale.float()
    pre = torch.sigmoid(mu[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mu[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = mu[..., 2 * n:].unflatten(-1, (n, n)) * scale[2] + base[2 * n:].view(n, n)
    C = sinkhorn(comb, iters, hc_eps)
    h = collapse(pre, X)
    return h, post, C


def _multiply_adds(acc: torch.Tensor, terms: list) -> torch.Tensor:
    """acc + sum of a * b over terms [(a, b)], one pass each (one fused kernel when compiled); in place
    when no gradient flows through them (inference), out of place otherwise."""
    grad = torch.is_grad_enabled() and (acc.requires_grad or any(a.requires_grad or b.requires_grad for a, b in terms))
    for a, b in terms:
        acc = torch.addcmul(acc, a, b) if grad else acc.addcmul_(a, b)
    return acc


def collapse(pre: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """sum_j pre_j X_j in fp32, cast to X's dtype. pre: [B,S,n], X: [B,S,n,d] -> [B,S,d].
    As n multiply-adds into one [B,S,d] result, not a [B,S,n,d] product reduced afterwards."""
    Xf = X.float()
    terms = [(Xf[..., j, :], pre[..., j:j + 1]) for j in range(1, X.shape[-2])]
    return _multiply_adds(Xf[..., 0, :] * pre[..., 0:1], terms).to(X.dtype)


def hc_post(f: torch.Tensor, X: torch.Tensor, post: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X_k <- post_k * f + sum_j C[j,k] X_j, in fp32, cast to X's dtype. f: [B,S,d], X: [B,S,n,d].
    The sum as n multiply-adds (a batch of n x n matmuls is slow on the CPU and does not fuse)."""
    Xf = X.float()
    terms = [(C[..., j, :].unsqueeze(-1), Xf[..., j, :].unsqueeze(-2)) for j in range(X.shape[-2])]
    return _multiply_adds(post.unsqueeze(-1) * f.float().unsqueeze(-2), terms).to(X.dtype)


def hc_head(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
            hc_eps: float) -> torch.Tensor:
    """Final collapse: pre = sigmoid(mu * scale + base) + eps, y = sum_j pre_j X_j. [B,S,n,d] -> [B,S,d]."""
    mu = hc_mix_inputs(X, fn, norm_eps)
    pre = torch.sigmoid(mu * scale.float() + base.float()) + hc_eps
    return collapse(pre, X)

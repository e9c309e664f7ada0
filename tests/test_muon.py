"""Muon against hand-computed cases: Newton-Schulz on known singular values, update RMS, weight decay."""
import re

import pytest
import torch

import dsv4
from dsv4.train import Muon, newton_schulz, param_groups
from helpers import random_model


def scalar_ns(s: float) -> float:
    """The same iteration on one singular value: x <- a x + b x^3 + c x^5."""
    for a, b, c in [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2:
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def test_newton_schulz_acts_on_singular_values_as_the_scalar_polynomial():
    # G = U diag(3, 1) V^T; after Frobenius normalisation the singular values are 3/sqrt(10) and 1/sqrt(10)
    U = torch.linalg.qr(torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    G = U @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ V.T  # [4, 3], rank 2
    want = U @ torch.diag(torch.tensor([scalar_ns(3 / 10 ** 0.5), scalar_ns(1 / 10 ** 0.5)], dtype=torch.float64)) @ V.T
    assert torch.allclose(newton_schulz(G), want, atol=1e-9)  # fp64: the matrix iteration is the scalar one
    assert torch.allclose(newton_schulz(G.float()).double(), want, atol=2e-3)  # fp32 rounding, amplified
    assert abs(scalar_ns(1 / 10 ** 0.5) - 1) < 0.05 and abs(scalar_ns(3 / 10 ** 0.5) - 1) < 0.05  # ~orthogonal


def test_update_rms_matches_adamw_and_weight_decay_is_decoupled():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 256))
    p0 = p.detach().clone()
    p.grad = torch.randn(64, 256)
    Muon([p], lr=1.0, momentum=0.0, weight_decay=0.0, nesterov=False).step()
    rms = (p.detach() - p0).square().mean().sqrt().item()
    assert abs(rms - 0.2) < 0.02  # 0.2 * sqrt(max(64, 256)) * (1 / sqrt(256)) for an orthogonal update
    q = torch.nn.Parameter(torch.ones(8, 8))
    q.grad = torch.zeros(8, 8)
    Muon([q], lr=0.5, weight_decay=0.1).step()
    assert torch.allclose(q.detach(), torch.full((8, 8), 1 - 0.5 * 0.1))  # zero gradient: only the decay


def test_param_groups_split_matrices_from_the_rest():
    """AdamW takes the embedding, the output head, every RMSNorm weight, the mHC static biases and gating factors
    (`hc_*_base`, `hc_*_scale`), attention sinks and the compressors' position biases (`ape`, an additive bias
    [ratio, d] although 2-D); Muon takes every other parameter, each a matrix or a stack of expert matrices.
    (The model has no Linear biases; the router's selection bias is a buffer, not trained by gradients.)"""
    model = random_model(dsv4.Config.tiny())
    muon, adamw = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    leaf = {n: n.rsplit(".", 1)[-1] for n in names.values()}

    def adamw_rule(n):  # written from architecture.md section 12, not from muon.py's tuple
        return (n in ("embed.weight", "head.weight") or n.endswith("norm.weight")
                or re.fullmatch(r"hc_\w+_(base|scale)", leaf[n]) is not None or leaf[n] in ("attn_sink", "ape"))
    want_adamw = {n for n in names.values() if adamw_rule(n)}
    assert {names[id(p)] for p in adamw} == want_adamw
    assert {names[id(p)] for p in muon} == set(names.values()) - want_adamw
    for p in muon:
        n = names[id(p)]
        assert p.dim() == 2 or (p.dim() == 3 and ".experts.w" in n), n
    assert sum(n.endswith(".ape") for n in want_adamw) == 2 * 2 + 1  # 2 CSA layers (compressor, indexer's) + 1 HCA
    assert any(n.endswith("experts.w1") for n in names.values() if n not in want_adamw)
    assert len(muon) + len(adamw) == sum(1 for _ in model.parameters())


def test_muon_trains_a_small_model():
    torch.manual_seed(0)
    model = random_model(dsv4.Config.tiny(num_nextn_predict_layers=0)).train()
    muon, adamw = param_groups(model)
    opts = [Muon(muon, lr=0.02), torch.optim.AdamW(adamw, lr=3e-3)]
    ids = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), ids[:, 1:].reshape(-1))
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_grouped_output_projection_is_orthogonalised_group_by_group():
    """wo_a [G * r, in] is G separate matrices (attention.py: `wo_a.weight.view(G, -1, in)`): each group's update
    is Newton-Schulz of that group's own gradient, scaled by 0.2 * sqrt(max(r, in)); another group's gradient
    does not change it (one orthogonalisation of the whole stack couples them)."""
    from dsv4.model.attention import Attention
    from dsv4.train.muon import optimizers

    cfg = dsv4.Config.tiny(o_groups=4, num_attention_heads=4, num_nextn_predict_layers=0)
    model = random_model(cfg)
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    G, r, n_in = cfg.o_groups, cfg.o_lora_rank, attn.wo_a.weight.shape[1]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(r, n_in, generator=g) for _ in range(G)]

    def update(group_grads):
        w = attn.wo_a.weight
        before = w.detach().clone()
        for p in model.parameters():
            p.grad = None
        w.grad = torch.cat(group_grads)
        muon = optimizers(model, lr_muon=1.0, lr_adamw=0.0, weight_decay=0.0)[0]
        for grp in muon.param_groups:
            grp["momentum"], grp["nesterov"] = 0.0, False  # the update is the orthogonalised gradient itself
        muon.step()
        with torch.no_grad():
            change = (before - w).view(G, r, n_in)
            w.copy_(before)
        return change

    got = update(grads)
    for i in range(G):  # the hand computation: each group alone
        want = newton_schulz(grads[i]) * 0.2 * max(r, n_in) ** 0.5
        assert torch.allclose(got[i], want, atol=1e-5), i
    boosted = update([grads[0] * 10, *grads[1:]])
    assert torch.allclose(boosted[1:], got[1:], atol=1e-6)  # group 0's gradient leaves the others' updates alone


def ns_reference(G: torch.Tensor) -> torch.Tensor:
    """The hybrid Newton-Schulz iteration written out in fp64 (architecture.md section 12): X = G / ||G||_F on the
    wide side, 8 steps of X <- aX + (bA + cA^2)X with A = XX^T and (3.4445, -4.7750, 2.0315), then 2 with (2, -1.5, 0.5)."""
    X = G.double()
    wide = X.shape[0] <= X.shape[1]
    X = X if wide else X.T
    X = X / X.norm()
    for k in range(10):
        a, b, c = (3.4445, -4.7750, 2.0315) if k < 8 else (2.0, -1.5, 0.5)
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.T


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
def test_two_steps_with_momentum_hand_computed(nesterov):
    """buf_t = mu buf_{t-1} + g_t; the orthogonalised direction u_t is g_t + mu buf_t (Nesterov) or buf_t; the step is
    p <- p (1 - lr wd) - lr * 0.2 * sqrt(max(rows, cols)) * NS(u_t). Step 2 mixes g1 into the update: with g1 and g2
    independent, NS(g2), NS(buf_2) and NS(g2 + mu buf_2) are far apart, so dropping momentum or Nesterov shows."""
    mu, lr, wd, (m, n) = 0.9, 0.05, 0.1, (10, 6)  # tall: Muon orthogonalises the transpose
    gen = torch.Generator().manual_seed(0)
    g1, g2 = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen)
    p = torch.nn.Parameter(torch.randn(m, n, generator=gen))
    opt = Muon([p], lr=lr, momentum=mu, weight_decay=wd, nesterov=nesterov)
    want = p.detach().double().clone()
    buf = torch.zeros(m, n, dtype=torch.float64)
    scale = 0.2 * max(m, n) ** 0.5
    for g in (g1, g2):
        buf = mu * buf + g.double()
        u = g.double() + mu * buf if nesterov else buf
        want = want * (1 - lr * wd) - lr * scale * ns_reference(u)
        p.grad = g.clone()
        opt.step()
        assert torch.allclose(p.detach().double(), want, rtol=0, atol=1e-5), (p.detach().double() - want).abs().max()

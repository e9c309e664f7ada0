"""Muon against hand-computed cases: Newton-Schulz on known singular values, update RMS, weight decay."""
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
    model = random_model(dsv4.Config.tiny())
    muon, adamw = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in muon)
    adamw_names = {names[id(p)] for p in adamw}
    assert "embed.weight" in adamw_names and "head.weight" in adamw_names
    assert any(names[id(p)].endswith("experts.w1") for p in muon)
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

"""The Lightning Indexer trains on its own KL loss against the main attention (DeepSeek-V3.2's sparse stage):
its target is the attention's probability of each pick summed over heads, its loss reaches only the indexer."""
import math

import numpy as np
import pytest
import torch

import dsv4
from dsv4.config import CSA
from dsv4.model.attention import sparse_attention
from dsv4.model.compressor import Indexer
from dsv4.train import TrainConfig, Trainer
from helpers import random_model

CFG = dsv4.Config.tiny(vocab_size=128, index_topk=4)  # fewer picks than visible entries past position 19


def tokens(n=20_000, seed=0):
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(2, 50), n // 48 + 1)[:n]
    return np.where(rng.random(n) < 0.1, rng.integers(0, 128, n), base).astype(np.int32)


def test_picked_mass_is_the_attention_probability_of_each_pick_summed_over_heads():
    torch.manual_seed(0)
    B, S, H, c, W, m = 1, 24, 3, 8, 4, 4
    q, kv, comp = torch.randn(B, S, H, c), torch.randn(B, S, c), torch.randn(B, S // m, c)
    sinks = torch.randn(H)
    index = torch.full((B, S, 2), -1)
    for t in range(S):  # the two latest visible entries, where there are any
        vis = (t + 1) // m
        for j, e in enumerate(range(max(0, vis - 2), vis)):
            index[0, t, j] = e
    mass = []
    sparse_attention(q, kv, sinks, W, 0.5, comp, m, index, picked_mass=mass)
    mass = torch.cat(mass, dim=1)
    for t in range(S):
        keys = [kv[0, p] for p in range(max(0, t - W + 1), t + 1)]
        picks = [int(e) for e in index[0, t] if e >= 0]
        want = [0.0, 0.0]
        for h in range(H):
            logits = [float(q[0, t, h] @ k) * 0.5 for k in keys + [comp[0, e] for e in picks]] + [float(sinks[h])]
            z = sum(math.exp(v) for v in logits)
            for j in range(len(picks)):
                want[j] += math.exp(logits[len(keys) + j]) / z
        assert mass[0, t].tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_kl_loss_against_a_hand_computation():
    torch.manual_seed(1)
    ix = Indexer(dim=8, q_lora_rank=8, n_heads=2, head_dim=4, ratio=4, topk=3, eps=1e-6)
    q, w, keys = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2), torch.randn(1, 5, 4)
    index = torch.tensor([[[-1, -1, -1], [0, 2, -1], [4, 1, 3]]])  # a query with no pick counts for nothing
    mass = torch.tensor([[[0.0, 0.0, 0.0], [0.2, 0.6, 0.0], [0.1, 0.3, 0.4]]])
    got = ix.kl_loss(q, w, keys, index, mass).item()
    kls = []
    for t in (1, 2):
        picks = [int(e) for e in index[0, t] if e >= 0]
        scores = [sum(float(w[0, t, h]) * max(0.0, float(q[0, t, h] @ keys[0, e])) for h in range(2)) for e in picks]
        logz = math.log(sum(math.exp(s) for s in scores))
        p = [float(mass[0, t, j]) for j in range(len(picks))]
        p = [x / sum(p) for x in p]
        kls.append(sum(pj * (math.log(pj) - (s - logz)) for pj, s in zip(p, scores)))
    assert got == pytest.approx(sum(kls) / 2, rel=1e-5)


def trainer(weight, steps=40):
    torch.manual_seed(0)
    return Trainer(random_model(CFG, seed=1), tokens(),
                   TrainConfig(steps=steps, batch_size=4, seq_len=48, warmup=2, indexer_loss_weight=weight))


def indexer_params(model):
    return {n for n, _ in model.named_parameters() if ".indexer." in n}


def test_the_indexer_loss_trains_the_indexer_and_nothing_else():
    """With the loss on, every indexer parameter gets a gradient and every other parameter the same gradient as
    with it off (the indexer's inputs are detached; its picks are discrete)."""
    assert CSA in CFG.layer_types
    grads = {}
    for weight in (0.0, 1.0):
        t = trainer(weight)
        ids, mask = t.batch()
        total, stats = t.loss(ids, mask)
        t.model.zero_grad(set_to_none=True)
        total.backward()
        grads[weight] = {n: p.grad for n, p in t.model.named_parameters()}
        assert ("indexer_loss" in stats) == bool(weight)
    names = indexer_params(t.model)
    assert names and all(grads[0.0][n] is None for n in names)
    assert all(grads[1.0][n] is not None and grads[1.0][n].abs().sum() > 0 for n in names)
    for n, g in grads[0.0].items():
        if n not in names:
            assert (g is None and grads[1.0][n] is None) or torch.equal(g, grads[1.0][n]), n


def captured_mass(model, attns, ids):
    """Per CSA layer: over queries with more visible entries than picks, the mean of (dense attention mass on
    the indexer's picks) / (the most mass any k entries hold)."""
    xs = {}
    hooks = [a.register_forward_pre_hook(lambda mod, args: xs.__setitem__(mod, args[0])) for a in attns]
    with torch.no_grad():
        model(ids)
        out = []
        for a in attns:
            x = xs[a]
            B, S, _ = x.shape
            pos = torch.arange(S)
            cos, sin = a.rope.cos_sin(pos)
            qr, q = a.project_q(x, cos, sin)
            comp = a.compressor(x, a.rope)
            T = comp.shape[1]
            vis = torch.arange(T)[None, :] < ((pos + 1) // a.ratio)[:, None]
            every = torch.where(vis, torch.arange(T)[None, :], -1)[None].expand(B, -1, -1)  # dense: all visible
            mass = []
            sparse_attention(q, a.project_kv(x, cos, sin), a.attn_sink, CFG.sliding_window, a.head_dim ** -0.5,
                             comp, a.ratio, every, picked_mass=mass)
            mass = torch.cat(mass, dim=1)
            qi, wi = a.indexer.queries(x, qr, pos, a.rope, False)
            picks = a.indexer.select(qi, wi, a.indexer.compressor(x, a.rope), 0)
            got = (mass.gather(-1, picks.clamp(min=0)) * (picks >= 0)).sum(-1)
            best = mass.topk(picks.shape[-1], dim=-1).values.sum(-1)
            rows = vis.sum(-1) > picks.shape[-1]
            out.append((got[:, rows] / best[:, rows]).mean().item())
    for h in hooks:
        h.remove()
    return out


def test_the_trained_indexer_picks_more_of_the_attention_on_held_out_text():
    """Training only the indexer on its loss (one batch) cuts the loss and raises, on another batch, the share of
    the dense attention's best-k mass that its picks hold (measured at 0.75-0.79 -> 0.83-0.84)."""
    t = trainer(1.0)
    attns = [b.attn for b in t.model.layers if b.attn.indexer is not None]
    ids, mask = t.batch()
    held_out, _ = t.batch()
    before = captured_mass(t.model, attns, held_out[:, :-1])
    opt = torch.optim.Adam([p for n, p in t.model.named_parameters() if ".indexer." in n], lr=3e-3)
    losses = []
    for _ in range(60):
        _, stats = t.loss(ids, mask)
        losses.append(stats["indexer_loss"])
        opt.zero_grad()
        torch.stack([a.indexer_loss for a in attns]).mean().backward()
        opt.step()
    assert losses[-1] < 0.1 * losses[0]
    after = captured_mass(t.model, attns, held_out[:, :-1])
    assert all(a > b + 0.03 for a, b in zip(after, before)), (before, after)


def test_the_trainer_moves_the_indexer_only_with_its_loss_on():
    for weight, moves in ((1.0, True), (0.0, False)):
        t = trainer(weight)
        before = {n: p.detach().clone() for n, p in t.model.named_parameters() if ".indexer." in n}
        for _ in range(3):
            t.step()
        changed = [not torch.equal(p, before[n]) for n, p in t.model.named_parameters() if n in before]
        assert changed and all(c == moves for c in changed)


def test_a_frozen_or_evaluated_indexer_has_no_loss_left_from_an_earlier_forward():
    model = random_model(CFG, seed=1).train()
    ids = torch.randint(2, 128, (2, 40))
    attns = [b.attn for b in model.layers if b.attn.indexer is not None]
    model(ids)
    assert all(a.indexer_loss is not None for a in attns)
    with torch.no_grad():
        model(ids)
    assert all(a.indexer_loss is None for a in attns)
    model(ids)
    for a in attns:
        a.indexer.requires_grad_(False)
    model(ids)
    assert all(a.indexer_loss is None for a in attns)

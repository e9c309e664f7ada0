"""Attention pieces against hand-computed expectations: banded window, chunking, sinks, quant points."""
import math

import pytest
import torch

import dsv4
import dsv4.model.attention as attention
from dsv4.model.attention import sparse_attention
from dsv4.model.compressor import pool_windows, top_entries
from dsv4.quant import rotate_fp4
from helpers import random_model


def dense_reference(q, kv, sinks, window, scale, comp=None, ratio=0, index=None):
    """Direct transcription of section 3: one softmax over window keys + permitted entries + sink."""
    B, L, H, c = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(L):
            keys = [kv[b, j] for j in range(max(0, t - window + 1), t + 1)]
            if comp is not None:
                if index is None:
                    keys += [comp[b, w] for w in range(comp.shape[1]) if w < (t + 1) // ratio]
                else:
                    keys += [comp[b, w] for w in index[b, t].tolist() if w >= 0]
            K = torch.stack(keys)
            for h in range(H):
                s = K @ q[b, t, h] * scale
                m = torch.maximum(s.max(), sinks[h])
                p = torch.exp(s - m)
                out[b, t, h] = (p[:, None] * K).sum(0) / (p.sum() + torch.exp(sinks[h] - m))
    return out


@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
@pytest.mark.parametrize("budget", [1 << 24, 64])  # one chunk, and many small chunks
def test_sparse_attention_matches_the_equations(kind, budget, monkeypatch):
    monkeypatch.setattr(attention, "CHUNK_BUDGET", budget)
    g = torch.Generator().manual_seed(0)
    B, L, H, c, W, m = 2, 37, 3, 8, 5, 4
    q, kv, sinks = torch.randn(B, L, H, c, generator=g), torch.randn(B, L, c, generator=g), torch.randn(H, generator=g)
    comp = index = None
    if kind != "sliding":
        comp = torch.randn(B, L // m, c, generator=g)
    if kind == "csa":
        index = torch.randint(-1, L // m, (B, L, 3), generator=g)
        index = torch.where(index < ((torch.arange(L) + 1) // m)[None, :, None], index, -1)
    got = sparse_attention(q, kv, sinks, W, c ** -0.5, comp, m, index)
    want = dense_reference(q, kv, sinks, W, c ** -0.5, comp, m, index)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_sparse_attention_gradients_match_the_equations(compiled):
    """Gradients through the banded window (eager and torch.compile'd) equal those of the direct transcription.

    Length 37 is not a multiple of the window: padded query blocks. (torch 2.13's inductor miscompiled the
    backward of an unfold-based band: wrong key gradients, and heap corruption at lengths like this.)"""
    g = torch.Generator().manual_seed(0)
    B, L, H, c, W = 2, 37, 3, 8, 5
    q, kv, sinks = torch.randn(B, L, H, c, generator=g), torch.randn(B, L, c, generator=g), torch.randn(H, generator=g)
    w = torch.randn(B, L, H, c, generator=g)

    def grads(fn):
        args = [t.clone().requires_grad_() for t in (q, kv, sinks)]
        return torch.autograd.grad((fn(*args, W, c ** -0.5) * w).sum(), args)

    got = grads(torch.compile(sparse_attention, fullgraph=True) if compiled else sparse_attention)
    for a, b in zip(got, grads(dense_reference)):
        assert torch.allclose(a, b, atol=1e-5)


def test_model_output_independent_of_chunking(monkeypatch):
    model = random_model(dsv4.Config.tiny())
    ids = torch.randint(0, 512, (2, 70))
    with torch.no_grad():
        a = model(ids)
        monkeypatch.setattr(attention, "CHUNK_BUDGET", 1000)
        b = model(ids)
    assert torch.allclose(a, b, atol=1e-5)


def test_csa_pooling_hand_computed():
    """Entry w pools window w-1's A halves and window w's B halves; entry 0 has only its B half."""
    m, c = 2, 1
    kv = torch.tensor([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]]])  # 2 windows of 2 tokens; [A|B]
    gate = torch.zeros(1, 4, 2)
    out = pool_windows(kv, gate, torch.zeros(m, 2 * c), m, overlap=True)
    # entry 0: mean of B halves of tokens 0,1 = 15; entry 1: mean of A(0,1) and B(2,3) = (1+2+30+40)/4
    assert out.flatten().tolist() == [15.0, 18.25]
    hca = pool_windows(kv[..., :1], gate[..., :1], torch.tensor([[0.0], [math.log(3.0)]]), m, overlap=False)
    assert torch.allclose(hca.flatten(), torch.tensor([(1 + 3 * 2) / 4, (3 + 3 * 4) / 4]))


def test_quant_simulation_points_hand_computed():
    cfg = dsv4.Config.tiny(head_dim=80, qk_rope_head_dim=16, quant_simulation=True)
    attn = random_model(cfg).layers[1].attn
    kv = torch.zeros(1, 1, 80)
    kv[0, 0, 0], kv[0, 0, 1], kv[0, 0, 64] = 896.0, -0.3, -0.3
    out = attn.kv_quant(kv)
    # nope block [0:64]: scale 2, -0.3 -> -0.3125; rope dims [64:80] untouched
    assert out[0, 0, 0].item() == 896.0 and out[0, 0, 1].item() == -0.3125 and out[0, 0, 64].item() == pytest.approx(-0.3)
    # Hadamard of a one-hot is constant 128^-1/2 = 0.0884; FP4 scale 2^-6, 5.657 -> 6 => 0.09375
    e0 = torch.zeros(128)
    e0[0] = 1.0
    assert torch.all(rotate_fp4(e0) == 0.09375)


def test_indexer_top_entries_rank_equal_scores_by_position():
    """Hand case: 2.0, 1.0, then the three zeros (-0.0 is 0) in entry order; and on random rows with many
    exact ties, the first k of a stable descending sort."""
    s = torch.tensor([[0.0, -0.0, 1.0, -1.0, 0.0, 2.0, float("-inf"), -2.0, 0.0]])
    assert top_entries(s, 5).tolist() == [[5, 2, 0, 1, 4]]
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    x[x.abs() < 0.5] = 0
    for k in (1, 7, 300):
        assert torch.equal(top_entries(x, k), torch.sort(x, descending=True, stable=True).indices[:, :k])


def test_quant_simulated_logits_do_not_depend_on_later_tokens():
    """FP4 indexer keys tie often (ReLUs of coarse dot products are exactly 0); a query's picks among ties
    used to depend on how many entries were scored, i.e. on the tokens after it (errors up to 0.46)."""
    model = random_model(dsv4.Config.tiny(head_dim=80, qk_rope_head_dim=16, quant_simulation=True), seed=1)
    ids = torch.randint(0, 512, (1, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)[0]
        for t in (40, 50, 60, 70):
            assert (model(ids[:, :t + 1])[0] - full[:t + 1]).abs().max() <= 1e-4, t


def test_quant_simulation_changes_logits_only_slightly():
    cfg = dsv4.Config.tiny(head_dim=80, qk_rope_head_dim=16, index_topk=64)
    model = random_model(cfg)
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        exact = model(ids)
        model.config.quant_simulation = True
        sim = model(ids)
    rel = ((exact - sim).norm() / exact.norm()).item()
    assert 0 < rel < 0.05  # FP8 e4m3 carries ~3 significant bits: a small, non-zero perturbation

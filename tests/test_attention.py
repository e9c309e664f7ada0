"""Attention pieces against hand-computed expectations: banded window, chunking, sinks, quant points."""
import math

import pytest
import torch

import dsv4
import dsv4.model.attention as attention
from dsv4.model.attention import sparse_attention
from dsv4.model.compressor import Indexer, pool_windows, top_entries
from dsv4.model.rope import Rope
from dsv4.quant import fp4_quant_dequant, fp8_quant_dequant, rotate_fp4
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


def capture_quant_points(model, ids, monkeypatch):
    """One forward with spies: per attention layer its input x, the kv/comp passed to sparse_attention and
    (CSA layers) the indexer queries and keys passed to select."""
    seen, current = {}, {}

    def enter(i, x):
        current["i"] = i
        seen[i] = {"x": x}
    for i, layer in enumerate(model.layers):
        layer.attn.register_forward_pre_hook(lambda m, args, i=i: enter(i, args[0]))
    real_attn, real_select = attention.sparse_attention, Indexer.select

    def attn_spy(q, kv, sinks, window, scale, comp=None, ratio=0, index=None, **kw):
        seen[current["i"]].update(kv=kv, comp=comp)
        return real_attn(q, kv, sinks, window, scale, comp, ratio, index, **kw)

    def select_spy(self, q, w, keys, start, *a, **kw):
        seen[current["i"]].update(qi=q, keys=keys)
        return real_select(self, q, w, keys, start, *a, **kw)
    monkeypatch.setattr(attention, "sparse_attention", attn_spy)
    monkeypatch.setattr(Indexer, "select", select_spy)
    with torch.no_grad():
        model(ids)
    return seen


def test_quant_simulation_rounds_kv_nope_dims_to_fp8_and_keeps_rope_dims():
    """architecture.md section 3/8: kv[..., :nope] = fp8_quant_dequant(kv[..., :nope], 64); RoPE dims stay
    exact. The expected kv is recomputed from the layer's input and weights (norm, RoPE, FP8 block 64)."""
    cfg = dsv4.Config.tiny(head_dim=80, qk_rope_head_dim=16, quant_simulation=True)
    model = random_model(cfg, seed=1)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as mp:
        seen = capture_quant_points(model, ids, mp)
    n = cfg.head_dim - cfg.qk_rope_head_dim  # 64: one FP8 block
    for i, layer in enumerate(model.layers):
        attn, got = layer.attn, seen[i]
        with torch.no_grad():
            cos, sin = attn.rope.cos_sin(torch.arange(ids.shape[1]))
            exact = Rope.rotate(attn.kv_norm(attn.wkv(got["x"])), cos, sin)
        kv = got["kv"]
        assert not torch.equal(exact[..., :n], fp8_quant_dequant(exact[..., :n], 64))  # rounding does something
        assert torch.equal(kv[..., :n], fp8_quant_dequant(exact[..., :n], 64)), i
        assert torch.equal(kv[..., :n], fp8_quant_dequant(kv[..., :n], 64)), i  # on the FP8 grid: a fixed point
        assert torch.equal(kv[..., n:], exact[..., n:]), i  # RoPE dims untouched
        if got["comp"] is not None:  # compressed entries: the same FP8 point
            comp = got["comp"]
            assert torch.equal(comp[..., :n], fp8_quant_dequant(comp[..., :n], 64)), i


def test_quant_simulation_indexer_queries_and_keys_are_hadamard_fp4():
    """architecture.md section 5: indexer q = FP4(Hadamard(RoPE(qr @ Wq_b^I))), keys likewise, block 32.
    The queries are recomputed from the layer's input and weights."""
    cfg = dsv4.Config.tiny(head_dim=80, qk_rope_head_dim=16, quant_simulation=True)
    model = random_model(cfg, seed=1)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as mp:
        seen = capture_quant_points(model, ids, mp)
    csa = [i for i, layer in enumerate(model.layers) if layer.attn.indexer is not None]
    assert csa
    for i in csa:
        attn, got = model.layers[i].attn, seen[i]
        ix = attn.indexer
        B, S = ids.shape
        with torch.no_grad():
            q = ix.wq_b(attn.q_norm(attn.wq_a(got["x"]))).view(B, S, ix.n_heads, ix.head_dim)
            cos, sin = attn.rope.cos_sin(torch.arange(S))
            q = Rope.rotate(q, cos[:, None], sin[:, None])
        assert torch.equal(got["qi"], rotate_fp4(q)), i
        # on the FP4 grid, and within FP4 precision of the exact rotated query (Hadamard is orthogonal)
        assert torch.equal(got["qi"], fp4_quant_dequant(got["qi"], 32)), i
        assert torch.equal(got["keys"], fp4_quant_dequant(got["keys"], 32)), i
        # FP4 scale s = 2^ceil(log2(amax/6)) < amax/3; e2m1's widest gap is 2 (between 4 and 6): error <= s
        rq = q @ hadamard_matrix(ix.head_dim)
        amax = rq.unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True)
        assert ((got["qi"] - rq).unflatten(-1, (-1, 32)).abs() <= amax / 3 + 1e-6).all(), i


def hadamard_matrix(n: int) -> torch.Tensor:
    """Sylvester Walsh-Hadamard scaled by n^-1/2, built independently of dsv4.quant."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def test_quant_simulation_changes_logits_and_indexer_picks_only_slightly(monkeypatch):
    """index_topk 4 of up to 16 CSA entries, so the indexer's picks matter. Since Hq.Hk = q.k, the FP4
    indexer scores approximate the exact ones: most picks agree (a query left unrotated against rotated keys
    scores at random: about half agree, and the logits move 2-3 times as much)."""
    cfg = dsv4.Config.tiny(head_dim=80, qk_rope_head_dim=16, index_topk=4)
    model = random_model(cfg)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    picks, real_select = [], Indexer.select

    def select(*args, **kw):
        picks.append(real_select(*args, **kw))
        return picks[-1]
    monkeypatch.setattr(Indexer, "select", select)
    with torch.no_grad():
        exact = model(ids)
        model.config.quant_simulation = True
        sim = model(ids)
    n = len(picks) // 2
    assert n == 2  # two CSA layers
    same = total = 0
    for a, b in zip(picks[:n], picks[n:]):
        for x, y in zip(a.flatten(0, -2).tolist(), b.flatten(0, -2).tolist()):
            x, y = {v for v in x if v >= 0}, {v for v in y if v >= 0}
            same, total = same + len(x & y), total + len(x)
    assert total > 0 and same / total > 0.85, same / total
    rel = ((exact - sim).norm() / exact.norm()).item()
    assert 0 < rel < 0.2  # FP8 e4m3 KV (~3 significant bits) and a few flipped picks: small, non-zero

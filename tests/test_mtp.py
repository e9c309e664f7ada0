"""The MTP module against the equations of architecture.md section 2, and through both checkpoint formats."""
import numpy as np
import torch

import dsv4
from helpers import np_sinkhorn, random_model


def _np_rms(x, w, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def test_mtp_matches_hand_computed_equations():
    """Zero the MTP block's sub-layer outputs and mHC projections so every step is computable by hand:
    X' = e_proj(enorm(E[t+1])) + h_proj(hnorm(X_t)); each sub-layer leaves X_k = sum_j C[j,k] X_j with
    C = Sinkhorn(softmax(base)); the head collapses with pre = sigmoid(base) + eps."""
    cfg = dsv4.Config.tiny(num_hidden_layers=2, layer_types=["sliding_attention"] * 2)
    model = random_model(cfg, seed=11)
    m = model.mtp[0]
    with torch.no_grad():
        m.attn.wo_b.weight.zero_()
        m.ffn.experts.w2.zero_()
        m.ffn.shared_experts.w2.weight.zero_()
        for name in ("hc_attn_fn", "hc_ffn_fn", "hc_head_fn"):
            getattr(m, name).zero_()
    B, S, n, d = 2, 5, cfg.hc_mult, cfg.hidden_size
    X = torch.randn(B, S, n, d)
    nxt = torch.randint(0, cfg.vocab_size, (B, S))
    got = model.mtp_logits(X, nxt).detach().numpy()

    P = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    eps, hc_eps = cfg.rms_norm_eps, cfg.hc_eps
    e = _np_rms(P["embed.weight"][nxt.numpy()], P["mtp.0.enorm.weight"], eps) @ P["mtp.0.e_proj.weight"].T
    h = _np_rms(X.double().numpy(), P["mtp.0.hnorm.weight"], eps) @ P["mtp.0.h_proj.weight"].T
    Xm = e[:, :, None, :] + h
    for which in ("attn", "ffn"):
        base = P[f"mtp.0.hc_{which}_base"]
        C = np_sinkhorn(base[2 * n:].reshape(n, n), cfg.hc_sinkhorn_iters, hc_eps)
        Xm = np.einsum("jk,bsjd->bskd", C, Xm)
    pre = 1 / (1 + np.exp(-P["mtp.0.hc_head_base"])) + hc_eps
    y = np.einsum("j,bsjd->bsd", pre, Xm)
    want = _np_rms(y, P["mtp.0.norm.weight"], eps) @ P["head.weight"].T
    assert np.abs(got - want).max() < 1e-4


def test_mtp_uses_sliding_attention_and_topk_routing():
    cfg = dsv4.Config.tiny(num_hash_layers=10)
    model = random_model(cfg)
    m = model.mtp[0]
    assert m.attn.compressor is None and m.attn.indexer is None
    assert m.attn.rope.inv_freq[0].item() == 1.0  # plain RoPE (base 10000, no YaRN): theta_0 = 1
    assert not m.ffn.gate.hash


def test_mtp_weights_survive_hf_format_roundtrip(tmp_path):
    model = random_model(dsv4.Config.tiny(), seed=2)
    dsv4.save_model(model, tmp_path)
    back = dsv4.load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 40))
    X = model.streams(ids)
    nxt = torch.roll(ids, -1, 1)
    assert torch.equal(model.mtp_logits(X, nxt), back.mtp_logits(back.streams(ids), nxt))

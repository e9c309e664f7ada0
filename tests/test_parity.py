"""Parity with transformers' DeepseekV4ForCausalLM (the oracle) in fp32: logits, gradients, weights both ways."""
from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.checkpoint import canonical_name
from dsv4.config import CSA, HCA, SLIDING
from helpers import hf_model, random_model

CONFIGS = {
    # SWA, CSA and HCA layers; one hash layer; yarn; index_topk 8 (below and above #visible by S=70)
    "tiny": dsv4.Config.tiny(),
    # HCA first (Pro-like), two hash layers, 6 heads in 3 groups, small window, 3-of-6 experts
    "hca_first": dsv4.Config.tiny(hidden_size=48, num_attention_heads=6, head_dim=32, qk_rope_head_dim=8,
                                  o_groups=3, o_lora_rank=8, sliding_window=8,
                                  layer_types=[HCA, CSA, HCA, SLIDING, CSA], num_hidden_layers=5,
                                  hca_compress_ratio=8, num_hash_layers=2, n_routed_experts=6,
                                  num_experts_per_tok=3, index_n_heads=2, index_head_dim=16, index_topk=4,
                                  rope_factor=4.0, original_max_position_embeddings=64),
    # two mHC streams, 5 Sinkhorn iterations, no hash layer, index_topk above every #visible
    "wide_topk": dsv4.Config.tiny(hc_mult=2, hc_sinkhorn_iters=5, num_hash_layers=0, index_topk=64,
                                  layer_types=[CSA, SLIDING, HCA], num_hidden_layers=3, routed_scaling_factor=2.5),
}
LENGTHS = [5, 12, 40, 70]  # below the window, above it, spanning several HCA blocks


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    ours = random_model(cfg, seed=sorted(CONFIGS).index(request.param))
    path = tmp_path_factory.mktemp(request.param)
    dsv4.save_model(ours, path)
    return request.param, ours, hf_model(path)


@pytest.mark.parametrize("S", LENGTHS)
def test_logits_match_transformers(pair, S):
    name, ours, ref = pair
    B = 2 if name != "wide_topk" else 3
    ids = torch.randint(0, ours.config.vocab_size, (B, S), generator=torch.Generator().manual_seed(S))
    with torch.no_grad():
        a = ours(ids)
        b = ref(ids, use_cache=False).logits
    assert a.shape == (B, S, ours.config.vocab_size)
    assert (a - b).abs().max().item() <= 1e-4


def _hf_grads_as_ours(ref, ours):
    out = {}
    for hf_name, p in ref.named_parameters():
        name = canonical_name(hf_name)
        g = p.grad
        if name.endswith("ffn.experts.gate_up"):
            inter = p.shape[1] // 2
            base = name[: -len("gate_up")]
            out[base + "w1"] = None if g is None else g[:, :inter]
            out[base + "w3"] = None if g is None else g[:, inter:]
        else:
            out[name] = g
    return out


def test_gradients_match_transformers(pair):
    name, ours, ref = pair
    S = 70
    ids = torch.randint(0, ours.config.vocab_size, (2, S), generator=torch.Generator().manual_seed(7))
    w = torch.randn(2, S, ours.config.vocab_size, generator=torch.Generator().manual_seed(8))
    ours.zero_grad()
    ref.zero_grad()
    (ours(ids) * w).sum().backward()
    (ref(ids, use_cache=False).logits * w).sum().backward()
    theirs = _hf_grads_as_ours(ref, ours)
    checked = 0
    for pname, p in ours.named_parameters():
        if pname.startswith("mtp."):
            continue
        g_ref = theirs[pname]
        if g_ref is None or p.grad is None:
            # the indexer only selects entries: no gradient reaches it in either implementation
            assert g_ref is None and p.grad is None, pname
            assert ".indexer." in pname, pname
            continue
        scale = g_ref.abs().max().item()
        assert (p.grad - g_ref).abs().max().item() <= 1e-4 * max(scale, 1e-6), pname
        checked += 1
    assert checked > 50


def test_transformers_checkpoint_loads_with_equal_logits(tmp_path):
    """transformers save_pretrained -> dsv4.load_model."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = CONFIGS["tiny"]
    hf_cfg = DeepseekV4Config(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures",)})
    torch.manual_seed(3)
    ref = DeepseekV4ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # transformers initialises sinks, biases and ape to zero: make them non-trivial
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for n, b in ref.named_buffers():
            if n.endswith("tid2eid"):
                b.copy_(torch.randint(0, cfg.n_routed_experts, b.shape))
            elif n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b))
    ref.save_pretrained(tmp_path)
    ours = dsv4.load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 50))
    with torch.no_grad():
        assert (ours(ids) - ref(ids, use_cache=False).logits).abs().max().item() <= 1e-4


def test_save_load_roundtrip_is_exact(tmp_path):
    ours = random_model(CONFIGS["tiny"], seed=5)
    dsv4.save_model(ours, tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = dsv4.load_model(tmp_path, dtype=torch.float32)
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

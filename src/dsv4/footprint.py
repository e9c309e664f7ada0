"""Parameter counts and KV-cache bytes from a config (architecture.md sections 1 and 9)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import CSA, HCA, Config

# DeepSeek-V3.2 baseline: 61 layers of MLA latent (512 + 64 rope) and a 128-dim indexer key
V32_LAYERS = 61


@dataclass(frozen=True)
class Convention:
    name: str
    description: str

    def main_entry(self, cfg: Config) -> float:
        nope, rope = cfg.nope_head_dim, cfg.qk_rope_head_dim
        if self.name == "A":
            return nope + 2 * rope  # FP8 nope + BF16 rope
        if self.name in ("B", "B'"):
            return nope + 2 * rope + -(-(nope // 64 + 1) // 8) * 8  # + UE8M0 scale per 64, padded
        return 2 * cfg.head_dim  # all BF16

    def index_entry(self, cfg: Config) -> float:
        c = cfg.index_head_dim
        return {"A": c / 2, "B": c / 2 + c / 32, "B'": c + 4, "C": 2 * c}[self.name]

    def v32(self) -> tuple[float, float]:
        """(MLA entry, indexer key) bytes for V3.2 under this convention."""
        return {"A": (640, 128), "B": (656, 132), "B'": (656, 132), "C": (1152, 256)}[self.name]


CONVENTIONS = {
    "A": Convention("A", "logical payload: FP8 nope + BF16 rope, FP4 indexer keys"),
    "B": Convention("B", "packed with scales, MXFP4 indexer keys"),
    "B'": Convention("B'", "packed with scales, FP8 indexer keys"),
    "C": Convention("C", "all BF16 (reference buffers)"),
}


def kv_bytes_per_token(cfg: Config, conv: str = "A") -> float:
    """Amortised bytes per context token: sum over CSA layers (e_main + e_idx)/m + HCA layers e_main/m'."""
    c = CONVENTIONS[conv]
    e_main, e_idx = c.main_entry(cfg), c.index_entry(cfg)
    total = 0.0
    for t in cfg.layer_types:
        if t == CSA:
            total += (e_main + e_idx) / cfg.csa_compress_ratio
        elif t == HCA:
            total += e_main / cfg.hca_compress_ratio
    return total


def kv_bytes_at(cfg: Config, context: int, conv: str = "A") -> float:
    """Total KV bytes for one sequence of `context` tokens: compressed entries plus the fixed windows."""
    c = CONVENTIONS[conv]
    e_main, e_idx = c.main_entry(cfg), c.index_entry(cfg)
    total = 0.0
    for t in cfg.layer_types:
        if t == CSA:
            total += (context // cfg.csa_compress_ratio) * (e_main + e_idx)
        elif t == HCA:
            total += (context // cfg.hca_compress_ratio) * e_main
    windows = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return total + windows * min(cfg.sliding_window, context) * e_main


def v32_bytes_per_token(conv: str = "A") -> float:
    mla, idx = CONVENTIONS[conv].v32()
    return V32_LAYERS * (mla + idx)


def _block_params(cfg: Config, layer: int, active: bool) -> int:
    d, H, c, q, G, dg = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank, cfg.o_groups,
                         cfg.o_lora_rank)
    n = cfg.hc_mult
    p = 2 * ((2 + n) * n * n * d + (2 + n) * n + 3) + 2 * d  # mHC x2, attn/ffn norms
    p += d * q + q + q * H * c + d * c + c + G * dg * (H * c // G) + d * G * dg + H  # attention
    ratio = cfg.compress_ratio(layer)
    t = cfg.layer_types[layer] if layer < cfg.num_hidden_layers else None
    if ratio:
        coff = 2 if t == CSA else 1
        p += ratio * coff * c + 2 * d * coff * c + c
    if t == CSA:
        ci, ni = cfg.index_head_dim, cfg.index_n_heads
        p += q * ni * ci + d * ni + ratio * 2 * ci + 2 * d * 2 * ci + ci
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    p += E * d + (E if not cfg.is_hash_layer(layer) else 0)
    p += (cfg.num_experts_per_tok if active else E) * 3 * d * I + cfg.n_shared_experts * 3 * d * I
    return p


def param_counts(cfg: Config) -> dict[str, int]:
    """Total and active (per token: top-k routed experts, embedding and head included; once if tied) parameter
    counts."""
    d, n = cfg.hidden_size, cfg.hc_mult
    top = (1 if cfg.tie_word_embeddings else 2) * cfg.vocab_size * d + d + n * n * d + n + 1
    out = {}
    for key, active in (("total", False), ("active", True)):
        main = top + sum(_block_params(cfg, i, active) for i in range(cfg.num_hidden_layers))
        mtp = cfg.num_nextn_predict_layers * (_block_params(cfg, cfg.num_hidden_layers, active)
                                              + 2 * d * d + 3 * d + n * n * d + n + 1)
        out[key] = main
        out[f"{key}_with_mtp"] = main + mtp
    return out


def prefill_flops(cfg: Config, S: int) -> float:
    """Forward FLOPs of a length-S prefill (multiply-add = 2): every projection and expert on every token,
    plus attention over each query's keys (window, visible HCA entries or CSA top-k) and the indexer's
    scoring of every visible CSA entry."""
    p = param_counts(cfg)
    d, V = cfg.hidden_size, cfg.vocab_size
    # the embedding lookup is free, the head a matmul
    dense = 2 * (p["active"] - (1 if cfg.tie_word_embeddings else 2) * V * d) + 2 * V * d
    t = torch.arange(S, dtype=torch.float64)
    H, c = cfg.num_attention_heads, cfg.head_dim
    keys = torch.zeros(S, dtype=torch.float64)
    index = torch.zeros(S, dtype=torch.float64)
    for kind in cfg.layer_types:
        keys += torch.clamp(t + 1, max=cfg.sliding_window)
        if kind == HCA:
            keys += torch.div(t + 1, cfg.hca_compress_ratio, rounding_mode="floor")
        elif kind == CSA:
            vis = torch.div(t + 1, cfg.csa_compress_ratio, rounding_mode="floor")
            keys += torch.clamp(vis, max=cfg.index_topk)
            index += vis
    attn = 2 * 2 * H * c * keys.sum().item()  # QK and PV
    idx = 2 * cfg.index_n_heads * cfg.index_head_dim * index.sum().item()
    return S * dense + attn + idx

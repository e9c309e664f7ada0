"""Shared-KV MQA with sliding window, compressed entries and attention sinks (architecture.md section 3).

One softmax runs over the union of the sliding-window keys (the last `window` raw tokens,
itself included) and the permitted compressed entries (all visible ones for HCA, the
indexer's top-k for CSA), plus a per-head sink logit that has no value. K = V.
In training, a CSA layer also computes the indexer's loss against this attention (`Indexer.kl_loss`).
Queries are processed in chunks, so memory is O(S * (window + index_topk + S/m')), never S x S.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import CSA, SLIDING, Config
from ..quant import fp8_quant_dequant, rotate_fp4
from .compressor import Compressor, Indexer
from .norm import RMSNorm
from .rope import Rope

# elements of the per-chunk score / gather tensors; bounds peak memory of long forwards
CHUNK_BUDGET = 1 << 24


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, sinks: torch.Tensor, window: int, scale: float,
                     comp: torch.Tensor | None = None, ratio: int = 0, index: torch.Tensor | None = None,
                     q_start: int = 0, kv_start: int = 0, picked_mass: list | None = None) -> torch.Tensor:
    """Attention of queries at positions q_start..q_start+L-1 over raw keys and compressed entries.

    q: [B, L, H, c]; kv: [B, P, c] raw keys at positions kv_start..kv_start+P-1 (covering each query's
    window: kv_start <= max(0, q_start - window + 1), P >= q_start + L - kv_start); sinks: [H];
    comp: [B, T, c] entries (entry w
    visible to query t iff w < (t+1) // ratio); index: [B, L, k] CSA picks into comp, -1 = none
    (None with comp given means all visible entries, as in HCA). Returns [B, L, H, c] in q's dtype.
    picked_mass: a list to which, with index given, each chunk of queries appends the attention probability
    of each pick summed over heads, [B, l, k] fp32, detached (the Lightning Indexer's training target).

    The window part is banded: queries go in blocks of `window`, each block against the 2*window raw
    keys that end with it, so its cost is O(L * window), whatever the chunk size.
    """
    B, L, H, c = q.shape
    W = window
    has_comp = comp is not None and comp.shape[1] > 0
    k_comp = 0 if not has_comp else (index.shape[-1] if index is not None else comp.shape[1])
    per_row = H * (2 * W + k_comp + 1) + (k_comp * c if index is not None else 0)
    chunk = max(W, min(L, CHUNK_BUDGET // max(1, B * per_row)) // W * W)
    # kvp[i] holds raw position kv_start + i - W: W zero rows in front (masked), 2W behind for padded queries
    kvp = torch.cat([kv.new_zeros(B, W, c), kv[:, :q_start + L - kv_start], kv.new_zeros(B, 2 * W, c)], dim=1)
    w_idx = torch.arange(W, device=q.device)[:, None]
    k_idx = torch.arange(2 * W, device=q.device)[None, :]
    band = (k_idx > w_idx) & (k_idx <= w_idx + W)  # [W, 2W]: key k of a block sees query row w
    outs = []
    for s0 in range(0, L, chunk):
        s1 = min(L, s0 + chunk)
        n = -(-(s1 - s0) // W)  # blocks in this chunk
        qc = q[:, s0:s1]
        if n * W > s1 - s0:
            qc = torch.cat([qc, qc.new_zeros(B, n * W - (s1 - s0), H, c)], dim=1)
        T0 = q_start + s0  # first query position of the chunk; block b starts at T0 + b*W
        r0 = T0 - kv_start
        blocks = kvp[:, r0:r0 + (n + 1) * W].reshape(B, n + 1, W, c)
        keys = torch.cat([blocks[:, :-1], blocks[:, 1:]], dim=2)  # [B, n, 2W, c]; key k of block b at T0+bW-W+k
        first = T0 - W + torch.arange(n, device=q.device)[:, None, None] * W + k_idx[None]  # [n, 1, 2W] positions
        mask = band[None] & (first >= kv_start)  # [n, W, 2W]
        lw = torch.einsum("bnwhc,bnkc->bhnwk", qc.view(B, n, W, H, c), keys).mul(scale)
        lw = lw.masked_fill(~mask, float("-inf")).reshape(B, H, n * W, 2 * W)
        logits = [lw]
        t = torch.arange(T0, T0 + n * W, device=q.device)  # query positions (padded rows included)
        if has_comp:
            if index is None:  # HCA: every entry visible to the chunk's last query (later ones never are)
                seen = comp[:, : max(1, min(comp.shape[1], (q_start + s1) // ratio))]
                vis = torch.arange(seen.shape[1], device=q.device)[None, :] < ((t + 1) // ratio)[:, None]
                lc = torch.einsum("blhc,btc->bhlt", qc, seen).mul(scale).masked_fill(~vis, float("-inf"))
            else:
                ic = index[:, s0:s1]
                if n * W > s1 - s0:
                    ic = torch.cat([ic, ic.new_full((B, n * W - (s1 - s0), ic.shape[-1]), -1)], dim=1)
                picked = comp[torch.arange(B, device=q.device)[:, None, None], ic.clamp(min=0)]  # [B,l,k,c]
                lc = torch.einsum("blhc,blkc->bhlk", qc, picked).mul(scale)
                lc = lc.masked_fill((ic < 0).unsqueeze(1), float("-inf"))
            logits.append(lc)
        logits.append(sinks.float().view(1, H, 1, 1).expand(B, H, n * W, 1))  # the sink: a logit without a value
        p = torch.cat([x.float() for x in logits], dim=-1).softmax(-1).to(q.dtype)
        o = torch.einsum("bhnwk,bnkc->bnwhc", p[..., :2 * W].reshape(B, H, n, W, 2 * W), keys).reshape(B, n * W, H, c)
        if has_comp:
            pc = p[..., 2 * W:-1]
            o = o + (torch.einsum("bhlt,btc->blhc", pc, seen) if index is None
                     else torch.einsum("bhlk,blkc->blhc", pc, picked))
            if picked_mass is not None and index is not None:
                picked_mass.append(pc.detach().float().sum(1)[:, : s1 - s0])
        outs.append(o[:, : s1 - s0])
    return torch.cat(outs, dim=1)


class Attention(nn.Module):
    """Per-layer attention: low-rank q, single shared K=V head, optional compressor (+ indexer for CSA)."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.cfg = cfg
        d, H, c = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.rope_dim = H, c, cfg.qk_rope_head_dim
        self.ratio = cfg.compress_ratio(layer)
        self.layer_type = cfg.layer_types[layer] if layer < cfg.num_hidden_layers else SLIDING
        self.attn_sink = nn.Parameter(torch.zeros(H))
        self.wq_a = nn.Linear(d, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * c, bias=False)
        self.wkv = nn.Linear(d, c, bias=False)
        self.kv_norm = RMSNorm(c, cfg.rms_norm_eps)
        self.wo_a = nn.Linear(H * c // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, d, bias=False)
        self.compressor = self.indexer = None
        self.indexer_loss = None  # the Lightning Indexer's KL loss of the last training forward (CSA layers)
        if self.ratio:  # compressed layers: a compressor, YaRN RoPE at base compress_rope_theta
            self.compressor = Compressor(d, c, self.ratio, overlap=self.layer_type == CSA, eps=cfg.rms_norm_eps)
            self.rope = Rope(self.rope_dim, cfg.compress_rope_theta, cfg.rope_factor,
                             cfg.original_max_position_embeddings, cfg.beta_fast, cfg.beta_slow)
        else:
            self.rope = Rope(self.rope_dim, cfg.rope_theta)
        if self.layer_type == CSA:
            self.indexer = Indexer(d, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim, self.ratio,
                                   cfg.index_topk, cfg.rms_norm_eps)

    def kv_quant(self, kv: torch.Tensor) -> torch.Tensor:
        """Reference QAT point: FP8 (block 64) on the nope dims of K=V entries."""
        if not self.cfg.quant_simulation:
            return kv
        n = self.head_dim - self.rope_dim
        return torch.cat([fp8_quant_dequant(kv[..., :n], 64), kv[..., n:]], dim=-1)

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [B,S,d] -> qr [B,S,q_lora], q [B,S,H,c] (per-head RMS-normed, RoPE'd)."""
        B, S, _ = x.shape
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(B, S, self.n_heads, self.head_dim)
        q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.cfg.rms_norm_eps).to(q.dtype)
        return qr, Rope.rotate(q, cos[:, None], sin[:, None])

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B,S,d] -> kv [B,S,c] (normed, RoPE'd, optionally FP8-simulated)."""
        return self.kv_quant(Rope.rotate(self.kv_norm(self.wkv(x)), cos, sin))

    def output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """De-rotate, then the grouped low-rank output projection. o: [B,S,H,c] -> [B,S,d]."""
        B, S = o.shape[:2]
        G = self.cfg.o_groups
        o = Rope.rotate(o, cos[:, None], sin[:, None], inverse=True).reshape(B, S, G, -1)
        z = torch.einsum("bsgi,goi->bsgo", o, self.wo_a.weight.view(G, -1, o.shape[-1]))
        return self.wo_b(z.flatten(2))

    def forward(self, x: torch.Tensor, segments: list | None = None) -> torch.Tensor:
        """x: [B, S, d] (normed block input) -> [B, S, d].

        Without segments: full sequences from position 0. With segments: x is [1, N, d], the new
        tokens of several sequences back to back, and segments lists (LayerCache, n, L, hook) per run
        of tokens (its cache, tokens already processed, new tokens, None or a callable run on the cache
        once the segment is in); caches are read and advanced."""
        if segments is not None:
            return self.step(x, segments)
        B, S, _ = x.shape
        pos = torch.arange(S, device=x.device)
        cos, sin = self.rope.cos_sin(pos)
        qr, q = self.project_q(x, cos, sin)
        kv = self.project_kv(x, cos, sin)
        comp = index = mass = None
        if self.compressor is not None:
            comp = self.kv_quant(self.compressor(x, self.rope))
        if self.indexer is not None:
            # trained (and not frozen), the indexer learns from its own loss only: its inputs are cut from the
            # model's graph
            train = self.training and torch.is_grad_enabled() and self.indexer.wq_b.weight.requires_grad
            xi, qri = (x.detach(), qr.detach()) if train else (x, qr)
            keys = self.indexer.compressor(xi, self.rope)
            if self.cfg.quant_simulation:
                keys = rotate_fp4(keys)
            qi, wi = self.indexer.queries(xi, qri, pos, self.rope, self.cfg.quant_simulation)
            index = self.indexer.select(qi, wi, keys, 0)
            mass = [] if train else None
        o = sparse_attention(q, kv, self.attn_sink, self.cfg.sliding_window, self.head_dim ** -0.5,
                             comp, self.ratio, index, picked_mass=mass)
        # (None when not computed: a loss left from an earlier forward is not this one's)
        self.indexer_loss = None if mass is None else self.indexer.kl_loss(qi, wi, keys, index, torch.cat(mass, 1))
        return self.output(o, cos, sin)

    def step(self, x: torch.Tensor, segments: list) -> torch.Tensor:
        """Incremental forward over cached sequences (chunked prefill and decode alike). x: [1, N, d]."""
        if all(L == 1 for _, _, L, _ in segments) and len({id(c) for c, _, _, _ in segments}) == len(segments):
            return self.decode(x, segments)
        quant, W = self.cfg.quant_simulation, self.cfg.sliding_window
        pos = torch.cat([torch.arange(n, n + L) for _, n, L, _ in segments]).to(x.device)
        cos, sin = self.rope.cos_sin(pos)
        qr, q = self.project_q(x, cos, sin)
        kv = self.project_kv(x, cos, sin)[0]
        if self.compressor is not None:
            ckv, cgate = self.compressor.project(x[0])
        if self.indexer is not None:
            ikv, igate = self.indexer.compressor.project(x[0])
            qi, wi = self.indexer.queries(x, qr, pos, self.rope, quant)
        outs, off = [], 0
        for cache, n, L, hook in segments:
            sl = slice(off, off + L)
            off += L
            h = min(n, W - 1)  # earlier raw keys still inside the first new token's window
            # the new keys as stored (a bf16 ring under an fp32 model rounds them): as `decode` reads its own,
            # so where a prompt's chunks are cut does not change what it attends to
            stored = kv[sl].to(cache.window.dtype)
            ctx = torch.cat([cache.window[torch.arange(n - h, n) % W], stored]).to(kv.dtype)
            keep = min(L, W)
            cache.window[torch.arange(n + L - keep, n + L) % W] = stored[L - keep:]
            comp = index = None
            if self.compressor is not None:
                new = self.compressor.step(cache.comp, ckv[sl], cgate[sl], n, self.rope, x.dtype)
                cache.comp.append(self.kv_quant(new))
                comp = cache.comp.entries[None].to(x.dtype)
            if self.indexer is not None:
                new = self.indexer.compressor.step(cache.index, ikv[sl], igate[sl], n, self.rope, x.dtype)
                cache.index.append(rotate_fp4(new) if quant else new)
                index = self.indexer.select(qi[:, sl], wi[:, sl], cache.index.entries[None].to(x.dtype), n)
            outs.append(sparse_attention(q[:, sl], ctx[None], self.attn_sink, W, self.head_dim ** -0.5, comp,
                                         self.ratio, index, q_start=n, kv_start=n - h))
            if hook is not None:
                hook(cache)
        return self.output(torch.cat(outs, dim=1), cos, sin)

    def decode(self, x: torch.Tensor, segments: list) -> torch.Tensor:
        """One new token for each of several sequences, attended as one batch. x: [1, N, d]."""
        quant, W, N = self.cfg.quant_simulation, self.cfg.sliding_window, len(segments)
        caches = [c for c, _, _, _ in segments]
        n = torch.tensor([p for _, p, _, _ in segments], device=x.device)
        cos, sin = self.rope.cos_sin(n)
        qr, q = self.project_q(x, cos, sin)
        kv = self.project_kv(x, cos, sin)[0]
        slots = (n % W).tolist()
        for c, slot, row in zip(caches, slots, kv):
            c.window[slot] = row.to(c.window.dtype)
        keys = [torch.stack([c.window for c in caches]).to(x.dtype)]  # [N, W, c]: the ring, in slot order
        masks = [torch.arange(W, device=x.device)[None, :] <= n[:, None]]  # unfilled slots of short sequences
        picks = None
        if self.compressor is not None:
            ckv, cgate = self.compressor.project(x[0])
            for i, (c, p) in enumerate(zip(caches, n.tolist())):
                c.comp.append(self.kv_quant(self.compressor.step(c.comp, ckv[i:i + 1], cgate[i:i + 1], p, self.rope,
                                                                 x.dtype)))
            comp, visible = _padded([c.comp for c in caches], x.dtype)  # visible: every entry emitted so far
            if self.indexer is not None:
                ikv, igate = self.indexer.compressor.project(x[0])
                for i, (c, p) in enumerate(zip(caches, n.tolist())):
                    new = self.indexer.compressor.step(c.index, ikv[i:i + 1], igate[i:i + 1], p, self.rope, x.dtype)
                    c.index.append(rotate_fp4(new) if quant else new)
                ikeys, _ = _padded([c.index for c in caches], x.dtype)
                qi, wi = self.indexer.queries(x, qr, n, self.rope, quant)
                picks = self.indexer.select_batch(qi[0], wi[0], ikeys, visible)  # [N, k], -1 = none
                comp = comp[torch.arange(N, device=x.device)[:, None], picks.clamp(min=0)]  # [N, k, c]
                visible = picks >= 0
            keys.append(comp)
            masks.append(visible)
        o = attend_one(q[0], keys, masks, self.attn_sink, self.head_dim ** -0.5)[None]
        for cache, _, _, hook in segments:
            if hook is not None:
                hook(cache)
        return self.output(o, cos, sin)


def attend_one(q: torch.Tensor, keys: list, masks: list, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence over its keys (K = V) and a per-head sink logit without a value.
    q [N, H, c]; keys: parts [N, k_i, c] joined along k, masks: matching [N, k_i] bool -> [N, H, c]."""
    K = torch.cat(keys, dim=1)
    logits = torch.einsum("nhc,nkc->nhk", q, K).mul(scale)
    logits = logits.masked_fill(~torch.cat(masks, dim=1)[:, None, :], float("-inf"))
    logits = torch.cat([logits.float(), sinks.float()[None, :, None].expand(q.shape[0], -1, 1)], dim=-1)
    p = logits.softmax(-1)[..., :-1].to(q.dtype)
    return torch.einsum("nhk,nkc->nhc", p, K)


def _padded(states: list, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of several CompressorStates padded to one tensor [N, T_max, c] and the mask of real rows."""
    entries = [st.entries.to(dtype) for st in states]
    T = max(e.shape[0] for e in entries)
    out = entries[0].new_zeros(len(entries), T, entries[0].shape[1])
    for i, e in enumerate(entries):
        out[i, : e.shape[0]] = e
    counts = torch.tensor([e.shape[0] for e in entries], device=out.device)
    return out, torch.arange(T, device=out.device)[None, :] < counts[:, None]

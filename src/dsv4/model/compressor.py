"""KV compressors (CSA m=4 with overlap, HCA m'=128 without) and the Lightning Indexer.

architecture.md sections 4 and 5. Full-sequence form (positions 0..S-1): entry w pools
window w's tokens (and, for CSA, the A halves of window w-1) with a per-channel softmax
over gate + ape, then RMSNorm and RoPE at position w*m.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import rotate_fp4
from .norm import RMSNorm
from .rope import Rope


def pool_windows(kv: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor, ratio: int, overlap: bool,
                 prev_kv: torch.Tensor | None = None, prev_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax-pool complete windows.

    kv, gate: [B, n*m, coff*c] projected tokens of n complete windows (coff = 2 with overlap).
    ape: [m, coff*c]. prev_kv/prev_gate: [B, m, c] A halves of the window before the first one
    (overlap only; None means no earlier window, i.e. gate -inf). Returns [B, n, c].
    """
    B, L, D = kv.shape
    n = L // ratio
    kv = kv.view(B, n, ratio, D)
    gate = gate.view(B, n, ratio, D) + ape
    if not overlap:
        return (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(2)
    c = D // 2
    a_kv, b_kv = kv[..., :c], kv[..., c:]
    a_gate, b_gate = gate[..., :c], gate[..., c:]
    if prev_kv is None:
        prev_kv = kv.new_zeros(B, 1, ratio, c)
        prev_gate = gate.new_full((B, 1, ratio, c), float("-inf"))
    else:
        prev_kv, prev_gate = prev_kv.unsqueeze(1).to(kv.dtype), prev_gate.unsqueeze(1).to(gate.dtype)
    slots_kv = torch.cat([torch.cat([prev_kv, a_kv[:, :-1]], 1), b_kv], dim=2)  # [B, n, 2m, c]
    slots_gate = torch.cat([torch.cat([prev_gate, a_gate[:, :-1]], 1), b_gate], dim=2)
    return (slots_kv * slots_gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(2)


class Compressor(nn.Module):
    """Projects tokens to (kv, gate) and pools every `ratio` tokens into one entry of `head_dim`."""

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.ratio, self.overlap, self.head_dim = ratio, overlap, head_dim
        coff = 2 if overlap else 1
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim))
        self.wkv = nn.Linear(dim, coff * head_dim, bias=False)
        self.wgate = nn.Linear(dim, coff * head_dim, bias=False)
        self.norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x: [B, S, d] -> entries [B, S // ratio, head_dim] (normed, RoPE at w * ratio)."""
        B, S, _ = x.shape
        usable = S // self.ratio * self.ratio
        if usable == 0:
            return x.new_zeros(B, 0, self.head_dim)
        pooled = pool_windows(*self.project(x[:, :usable]), self.ape, self.ratio, self.overlap)
        return self.finish(pooled.to(x.dtype), 0, rope)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., d] -> (kv, gate) [..., coff*c] in fp32 (the reference runs the compressor in fp32)."""
        xc = x.to(self.wkv.weight.dtype)
        return self.wkv(xc).float(), self.wgate(xc).float()

    def step(self, st, kv: torch.Tensor, gate: torch.Tensor, n: int, rope: Rope, dtype) -> torch.Tensor:
        """Feed the projections of tokens n..n+L-1 (kv, gate: [L, coff*c]) into a CompressorState.

        Pools every window this completes and returns the new entries [k, c] (not yet appended);
        keeps the open window's tokens (and, with overlap, the last complete window's A half; before the
        first complete window that half is zeros with gate -inf, which pooling weighs 0)."""
        m, c = self.ratio, self.head_dim
        r = n % m
        if r:
            kv, gate = torch.cat([st.buf_kv[:r], kv]), torch.cat([st.buf_gate[:r], gate])
        full = kv.shape[0] // m * m
        new = kv.new_zeros(0, c).to(dtype)
        if full:
            prev = (st.prev_kv[None], st.prev_gate[None]) if self.overlap else (None, None)
            pooled = pool_windows(kv[None, :full], gate[None, :full], self.ape, m, self.overlap, *prev)
            new = self.finish(pooled.to(dtype), st.count, rope)[0]
            if self.overlap:  # in place: the state may be a view into a StatePool
                st.prev_kv.copy_(kv[full - m: full, :c])
                st.prev_gate.copy_(gate[full - m: full, :c] + self.ape[:, :c].float())
        rest = kv.shape[0] - full
        st.buf_kv[:rest], st.buf_gate[:rest] = kv[full:], gate[full:]
        return new

    def finish(self, pooled: torch.Tensor, first_entry: int, rope: Rope) -> torch.Tensor:
        """RMSNorm then RoPE at position (first_entry + i) * ratio. pooled: [B, n, c]."""
        out = self.norm(pooled)
        pos = (torch.arange(pooled.shape[1], device=pooled.device) + first_entry) * self.ratio
        cos, sin = rope.cos_sin(pos)
        return Rope.rotate(out, cos, sin)


class Indexer(nn.Module):
    """Lightning Indexer: I[t, w] = sum_h w[t,h] * ReLU(q[t,h] . K[w]); keeps the top index_topk visible entries."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, ratio: int, topk: int, eps: float):
        super().__init__()
        self.n_heads, self.head_dim, self.ratio, self.topk = n_heads, head_dim, ratio, topk
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)
        self.compressor = Compressor(dim, head_dim, ratio, overlap=True, eps=eps)

    def queries(self, x, qr, pos, rope, quant):
        """-> q [B, S, nI, cI] (RoPE at pos), head weights [B, S, nI] fp32."""
        B, S, _ = x.shape
        q = self.wq_b(qr).view(B, S, self.n_heads, self.head_dim)
        cos, sin = rope.cos_sin(pos)
        q = Rope.rotate(q, cos[:, None], sin[:, None])
        if quant:
            q = rotate_fp4(q)
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return q, w

    @torch.no_grad()
    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, start: int,
               budget: int = 1 << 24) -> torch.Tensor:
        """q [B,L,nI,cI] of queries at positions start..start+L-1, w [B,L,nI], keys [B,T,cI] -> indices [B,L,k]
        into keys, -1 where invalid.

        k = min(index_topk, T); only entries w < (t+1) // ratio are valid for query t.
        Queries are scored in chunks so the [L, nI, T] score tensor is never whole."""
        B, L = q.shape[:2]
        T = keys.shape[1]
        k = min(self.topk, T)
        if k == 0:
            return torch.empty(B, L, 0, dtype=torch.long, device=q.device)
        kt = keys.float().transpose(-1, -2).unsqueeze(1)  # [B,1,cI,T]
        chunk = max(1, min(L, budget // max(1, B * self.n_heads * T)))
        out = []
        for s0 in range(0, L, chunk):
            s1 = min(L, s0 + chunk)
            # only the entries the chunk's last query can see: later ones are masked for every row anyway
            Tc = min(T, (start + s1) // self.ratio)
            if Tc == 0:
                out.append(torch.full((B, s1 - s0, k), -1, dtype=torch.long, device=q.device))
                continue
            scores = F.relu(torch.matmul(q[:, s0:s1].float(), kt[..., :Tc]), inplace=True)  # [B,l,nI,Tc]
            scores = torch.matmul(w[:, s0:s1].unsqueeze(2), scores).squeeze(2)  # sum_h w_h relu(.): [B,l,Tc]
            limit = ((torch.arange(start + s0, start + s1, device=q.device) + 1) // self.ratio)[:, None]  # [l, 1]
            invisible = torch.arange(Tc, device=q.device)[None, :] >= limit
            idx = top_entries(scores.masked_fill(invisible, float("-inf")), min(k, Tc))
            idx = torch.where(idx >= limit, torch.full_like(idx, -1), idx)
            if idx.shape[-1] < k:
                idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], k - idx.shape[-1]), -1)], dim=-1)
            out.append(idx)
        return torch.cat(out, dim=1)

    def kl_loss(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, index: torch.Tensor,
                mass: torch.Tensor) -> torch.Tensor:
        """The indexer's training loss (DeepSeek-V3.2's sparse stage): per query t, KL(p_t || softmax(I_t)) over
        its picks, where p_t is the main attention's probability of each pick summed over heads, L1-normalised
        (a target: no gradient), and I_t the indexer's scores of the picks. Mean over queries with any pick.

        q [B,S,nI,cI], w [B,S,nI], keys [B,T,cI], index [B,S,k] (-1 = none), mass [B,S,k] -> scalar fp32.
        Only the indexer's parameters (through q, w and keys) get gradients from it."""
        B, S, k = index.shape
        if k == 0:
            return q.new_zeros((), dtype=torch.float32)
        valid = index >= 0
        picked = keys[torch.arange(B, device=keys.device)[:, None, None], index.clamp(min=0)]  # [B,S,k,cI]
        scores = F.relu(torch.einsum("bshc,bskc->bshk", q.float(), picked.float()))
        logq = torch.einsum("bsh,bshk->bsk", w, scores).masked_fill(~valid, float("-inf")).log_softmax(-1)
        p = mass.masked_fill(~valid, 0.0)
        total = p.sum(-1, keepdim=True)
        rows = total[..., 0] > 0
        p = p / total.clamp(min=torch.finfo(torch.float32).tiny)
        kl = torch.where(valid & (p > 0), p * (p.clamp(min=torch.finfo(torch.float32).tiny).log() - logq), 0.0)
        return (kl.sum(-1) * rows).sum() / rows.sum().clamp(min=1)  # (no data-dependent shapes: compilable)

    @torch.no_grad()
    def select_batch(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Decode form of `select`: one query per sequence. q [N,nI,cI], w [N,nI], keys [N,T,cI] padded,
        valid [N,T] (the entries each sequence has, all visible to its newest token) -> [N,k] picks, -1 = none."""
        T = keys.shape[1]
        k = min(self.topk, T)
        if k == 0:
            return torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        scores = F.relu(torch.einsum("nhc,ntc->nht", q.float(), keys.float()))
        scores = torch.einsum("nh,nht->nt", w, scores).masked_fill(~valid, float("-inf"))
        idx = top_entries(scores, k)
        return torch.where(valid.gather(1, idx), idx, torch.full_like(idx, -1))


def top_entries(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores along the last dim [..., T] -> [..., k]; among scores of exactly 0,
    the earlier entry first.

    With ReLU scores many entries score exactly 0 (every head's ReLU 0), and `torch.topk`'s choice among equal
    values depends on the row's length and layout: prefill, chunked prefill, decode and speculation (rows of
    different lengths) would attend to different entries. So a 0 becomes a distinct tiny negative, below 0 and
    above any real negative score, higher for the earlier entry: -2^-100 * (1 + j / T) for entry j."""
    return zeros_in_entry_order(scores).topk(k, dim=-1).indices


def zeros_in_entry_order(scores: torch.Tensor) -> torch.Tensor:
    """scores [..., T] with each exact 0 (or -0) at entry j replaced by -2^-100 * (1 + j / T)."""
    T = scores.shape[-1]
    rank = torch.arange(T, device=scores.device, dtype=torch.float32) / T + 1  # increasing in j whatever T
    return torch.where(scores == 0, rank * -2.0 ** -100, scores)

"""One decode token for each of N sequences, through every layer, as one function of tensors.

The general incremental path (`Transformer.step`) walks Python objects per sequence and per layer,
which costs thousands of small operations per token. Here the fixed-size state lives in a
`StatePool` (gathered and scattered by slot index inside the function), the compressed entries come
in as one padded tensor per compressor, and the only per-sequence work left outside is appending the
entries a step emits. With `compile=True` the whole step is compiled ahead of time (model/aot.py):
batch-1 matrix-vector products become fused reductions, which stream weights about 3x faster than
the BLAS matrix-vector call on CPUs where that call is slow.

Equal to `Transformer.step` up to float rounding (tests/test_decode.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import rotate_fp4
from . import aot
from .attention import attend_one
from .cache import StatePool
from .compressor import pool_windows
from .mhc import hc_head, hc_post
from .moe import PackedExperts
from .rope import Rope


def supports(model, layout: str, dtype: torch.dtype) -> bool:
    """Whether `BatchDecoder` can run this model and cache format (dense entries in the model's dtype,
    unpacked experts)."""
    return (layout == "dense" and dtype == model.dtype
            and not any(isinstance(b.ffn.experts, PackedExperts) for b in model.layers))


class BatchDecoder:
    """`decoder(caches, slots, tokens) -> logits [N, vocab]`: advances each cache by its token.

    caches: SequenceCaches made from `pool` (slots[j] is caches[j]'s slot), all distinct;
    tokens: one new token id per sequence. hooks[j], if given, runs per layer on caches[j] after the step."""

    def __init__(self, model, pool: StatePool, compile: bool = False):
        self.model, self.pool, self.cfg = model, pool, model.config
        self.core = aot.compiled(model, _core) if compile else _core
        # per layer with a compressor: (layer, ratio, least entry count (the indexer's static top-k), stores)
        self._layers = [(i, a.ratio, a.indexer.topk if a.indexer is not None else 0,
                         ("comp", "index") if a.indexer is not None else ("comp",))
                        for i, a in enumerate(block.attn for block in model.layers) if a.compressor is not None]
        # the last step's sequences, their entry stores' versions after it, their entries as padded batch tensors
        self._caches, self._versions_seen, self._batched = [], None, None

    # ---- outside the graph ----
    def __call__(self, caches: list, slots: list, tokens: list, hooks: list | None = None) -> torch.Tensor:
        dev = self.pool.device
        pos = [c.n for c in caches]
        entries = self._entries(caches)
        with torch.no_grad():
            logits, emitted = self.core(self.model, self.pool, torch.tensor(tokens, device=dev),
                                        torch.tensor(pos, device=dev), torch.tensor(slots, device=dev), entries)
        for i, m, _, _ in self._layers:
            done = [j for j, p in enumerate(pos) if (p + 1) % m == 0]
            if not done:
                continue
            rows = torch.tensor(done, device=dev)
            at = torch.tensor([pos[j] // m for j in done], device=dev)
            for name, new, buf in zip(("comp", "index"), emitted[i], entries[i]):
                buf.index_put_((rows, at), new[rows].to(buf.dtype))  # keep the batch copy current
                for j in done:
                    getattr(caches[j].layers[i], name).append(new[j:j + 1])
        self._versions_seen = self._versions(caches)
        for j, c in enumerate(caches):
            c.n += 1
            if hooks and hooks[j] is not None:
                for i, lc in enumerate(c.layers):
                    hooks[j](f"L{i}.", lc)
        return logits

    def drop(self) -> None:
        """Forget the batch copy of the entries (its memory), e.g. when a sequence leaves."""
        self._caches, self._versions_seen, self._batched = [], None, None

    def _versions(self, caches: list) -> list:
        return [st.store.version for c in caches for lc in c.layers for st in (lc.comp, lc.index) if st is not None]

    def _rows(self, caches: list) -> list:
        """Per compressed layer (layer, T, its stores' names): the rows of its batch copy, a multiple of 64
        with room for this step's entry (it grows in steps: the compiled graph sees few distinct sizes)."""
        last = max(c.n for c in caches)
        return [(i, -(-max(last // m + 1, topk) // 64) * 64, names) for i, m, topk, names in self._layers]

    def copy_bytes(self, caches: list) -> int:
        """Bytes of the padded batch copy of the entries that a step over `caches` holds (every sequence's
        rows as many as the longest one's): memory beside their own decode state."""
        return sum(len(caches) * T * getattr(caches[0].layers[i], name).store.bytes_per_entry
                   for i, T, names in self._rows(caches) for name in names)

    def _entries(self, caches: list) -> list:
        """Per layer, each compressor's entries of all sequences as [N, T, c] (rows past a sequence's
        count arbitrary). Kept between steps: a step with the same sequences, whose entries changed only
        by that step's own appends, reuses them."""
        need = self._rows(caches)
        if (self._batched is not None and len(self._caches) == len(caches)
                and all(a is b for a, b in zip(self._caches, caches)) and self._versions_seen == self._versions(caches)
                and all(self._batched[i][0].shape[1] >= T for i, T, _ in need)):
            return self._batched
        entries = [None] * len(self.model.layers)
        for i, T, names in need:
            rows = [[getattr(c.layers[i], name).store.padded(T) for c in caches] for name in names]
            entries[i] = tuple(torch.stack(r) for r in rows)
        self._caches, self._batched = list(caches), entries
        return entries


# ---- the function (compiled as one graph) ----
def _core(model, pool: StatePool, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, entries: list):
    """ids, pos, slots: [N] -> (logits [N, vocab] fp32, per layer the entries each compressor pooled
    this step ([N, c]; real only where (pos + 1) % ratio == 0), for the caller to append)."""
    c = model.config
    X = model.embed(ids)[None, :, None].expand(-1, -1, c.hc_mult, -1).contiguous()  # [1, N, n, d]
    emitted = []
    for i, block in enumerate(model.layers):
        h, post, C = block._pre(X, "attn")
        o, new = _attention(c, pool, i, block.attn, block.attn_norm(h), pos, slots, entries[i])
        emitted.append(new)
        X = hc_post(o, X, post, C)
        h, post, C = block._pre(X, "ffn")
        X = hc_post(_moe(block.ffn, block.ffn_norm(h)[0], ids)[None], X, post, C)
    y = model.norm(hc_head(X, model.hc_head_fn, model.hc_head_base, model.hc_head_scale, c.rms_norm_eps,
                           c.hc_eps))[0].float()  # [N, d]
    if ids.shape[0] == 1 and torch.compiler.is_compiling():  # compiled, one row: a fused reduction streams
        return (y[:, None, :] * model.head.weight.float()).sum(-1), emitted  # the head faster than BLAS (eager: [V, d])
    return F.linear(y, model.head.weight.float()), emitted


def _attention(cfg, pool, i, a, x, pos, slots, entries):
    """Layer i's attention for one token per sequence. x: [1, N, d] -> ([1, N, d], entries pooled this step)."""
    W, N, quant = cfg.sliding_window, x.shape[1], cfg.quant_simulation
    cos, sin = a.rope.cos_sin(pos)
    qr, q = a.project_q(x, cos, sin)
    kv = a.project_kv(x, cos, sin)[0]  # [N, c]
    # the window ring: write this token's entry at slot pos % W, attend to the filled slots
    ring = pool.window[i]
    ring.index_put_((slots, pos % W), kv.to(ring.dtype))
    keys = [ring[slots].to(x.dtype)]  # [N, W, c]
    masks = [torch.arange(W, device=x.device)[None, :] <= pos[:, None]]
    new = ()
    if a.compressor is not None:
        m = a.ratio
        count = pos // m  # entries emitted before this token
        done = (pos + 1) % m == 0
        entry = a.kv_quant(_compress(a.compressor, pool.comp[i], x[0], pos, slots, a.rope))
        comp = _place(entries[0], entry, count, done)
        visible = torch.arange(comp.shape[1], device=x.device)[None, :] < (count + done.long())[:, None]
        new = (entry,)
        if a.indexer is not None:
            key = _compress(a.indexer.compressor, pool.index[i], x[0], pos, slots, a.rope)
            key = rotate_fp4(key) if quant else key
            ikeys = _place(entries[1], key, count, done)
            qi, wi = a.indexer.queries(x, qr, pos, a.rope, quant)
            picks = a.indexer.select_batch(qi[0], wi[0], ikeys, visible)  # [N, k], -1 = none
            comp = comp[torch.arange(N, device=x.device)[:, None], picks.clamp(min=0)]
            visible = picks >= 0
            new = (entry, key)
        keys.append(comp)
        masks.append(visible)
    o = attend_one(q[0], keys, masks, a.attn_sink, a.head_dim ** -0.5)[None]
    return a.output(o, cos, sin), new


def _compress(comp, st: dict, x, pos, slots, rope: Rope):
    """Feed one token per sequence into its open window (pool rows `slots`); -> the entry the window
    would pool now [N, c] (x's dtype), meaningful where the token completes it."""
    m, c = comp.ratio, comp.head_dim
    kv, gate = comp.project(x)  # [N, coff*c] fp32
    r = pos % m
    st["buf_kv"].index_put_((slots, r), kv)
    st["buf_gate"].index_put_((slots, r), gate)
    win_kv, win_gate = st["buf_kv"][slots], st["buf_gate"][slots]  # [N, m, coff*c], this token included
    prev = (st["prev_kv"][slots], st["prev_gate"][slots]) if comp.overlap else (None, None)
    pooled = pool_windows(win_kv, win_gate, comp.ape, m, comp.overlap, *prev)[:, 0]  # [N, c]
    if comp.overlap:  # a completed window's A half becomes the next one's `prev`
        done = ((pos + 1) % m == 0)[:, None, None]
        st["prev_kv"].index_put_((slots,), torch.where(done, win_kv[..., :c], prev[0]))
        st["prev_gate"].index_put_((slots,), torch.where(done, win_gate[..., :c] + comp.ape[:, :c].float(),
                                                         prev[1]))
    cos, sin = rope.cos_sin(pos // m * m)
    return Rope.rotate(comp.norm(pooled.to(x.dtype)), cos, sin)


def _moe(moe, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: [N, d] -> [N, d]: each token through its k experts (weights gathered by index) + the shared one.

    Compiled, the gathers fuse into the reductions; eager, the grouped MoE forward is cheaper."""
    if not torch.compiler.is_compiling():
        return moe(x[None], ids[None])[0]
    g, idx = moe.gate(x, ids)  # [N, k]
    (w1, w2, w3), lim = moe.experts.stacked(x.dtype), moe.limit
    xe = x[:, None, None, :]
    gate = (xe * w1[idx]).sum(-1).float().clamp(max=lim)  # [N, k, I]
    up = (xe * w3[idx]).sum(-1).float().clamp(-lim, lim)
    h = (F.silu(gate) * up * g[..., None]).to(x.dtype)
    y = (h[:, :, None, :] * w2[idx]).sum(-1).float().sum(1)  # [N, d]
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(x).float()
    return y.to(x.dtype)


def _place(entries: torch.Tensor, new: torch.Tensor, count: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """entries [N, T, c] padded, with the entry `new` [N, c] put at row count[j] where done[j]."""
    at = (torch.arange(entries.shape[1], device=new.device)[None, :] == count[:, None]) & done[:, None]
    return torch.where(at[..., None], new[:, None].to(entries.dtype), entries)

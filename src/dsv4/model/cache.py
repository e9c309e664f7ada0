"""Per-sequence decode state of DeepSeek-V4 (architecture.md section 4, "Incremental state").

For each layer: the sliding-window ring of raw K=V entries and, on compressed layers, each
compressor's open window (the projected tokens not yet pooled, plus CSA's previous A half) and
its emitted entries (and the indexer's keys on CSA layers). Everything needed to continue a
sequence exactly is here, so a snapshot of it is a prefix-cache entry and restoring an older
snapshot rewinds the sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _grow(t: torch.Tensor, need: int) -> torch.Tensor:
    if t.shape[0] >= need:
        return t
    out = t.new_zeros(max(need, 2 * t.shape[0], 16), *t.shape[1:])
    out[: t.shape[0]] = t
    return out


@dataclass
class CompressorState:
    """Open window of one compressor and its emitted entries. Rows [0, n % ratio) of buf_* are valid."""

    buf_kv: torch.Tensor  # [ratio, coff*c] fp32 projected tokens of the open window
    buf_gate: torch.Tensor  # [ratio, coff*c] fp32
    prev_kv: torch.Tensor | None = None  # [ratio, c] A halves of the last complete window (CSA)
    prev_gate: torch.Tensor | None = None  # [ratio, c], ape included
    store: torch.Tensor | None = None  # [capacity, c] emitted entries (storage dtype)
    count: int = 0

    @property
    def entries(self) -> torch.Tensor:
        return self.store[: self.count]

    def append(self, new: torch.Tensor) -> None:
        self.store = _grow(self.store, self.count + new.shape[0])
        self.store[self.count: self.count + new.shape[0]] = new.to(self.store.dtype)
        self.count += new.shape[0]

    def nbytes(self) -> int:
        t = [self.buf_kv, self.buf_gate, self.prev_kv, self.prev_gate]
        fixed = sum(x.numel() * x.element_size() for x in t if x is not None)
        return fixed + self.count * self.store.shape[1] * self.store.element_size()

    def clone(self) -> "CompressorState":
        c = lambda x: None if x is None else x.clone()  # noqa: E731
        return CompressorState(c(self.buf_kv), c(self.buf_gate), c(self.prev_kv), c(self.prev_gate),
                               self.store[: max(self.count, 1)].clone(), self.count)


@dataclass
class LayerCache:
    window: torch.Tensor  # [W, c] ring of raw K=V entries, slot = position % W
    comp: CompressorState | None = None
    index: CompressorState | None = None

    def nbytes(self) -> int:
        n = self.window.numel() * self.window.element_size()
        return n + sum(s.nbytes() for s in (self.comp, self.index) if s is not None)

    def clone(self) -> "LayerCache":
        return LayerCache(self.window.clone(), self.comp and self.comp.clone(), self.index and self.index.clone())


@dataclass
class SequenceCache:
    """Decode state of one sequence: `n` tokens processed, one LayerCache per main layer (+ MTP layers)."""

    layers: list
    n: int = 0
    mtp: list = field(default_factory=list)
    mtp_n: int = 0  # positions the MTP layer has processed

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers + self.mtp)

    def clone(self) -> "SequenceCache":
        return SequenceCache([c.clone() for c in self.layers], self.n, [c.clone() for c in self.mtp], self.mtp_n)


def new_cache(model, dtype: torch.dtype | None = None, device=None) -> SequenceCache:
    """An empty SequenceCache for `model` (a dsv4 Transformer). dtype: storage dtype of entries (fp32/bf16)."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    device = device or next(model.parameters()).device

    def layer(block):
        a = block.attn
        lc = LayerCache(torch.zeros(cfg.sliding_window, cfg.head_dim, dtype=dtype, device=device))
        for name, comp in (("comp", a.compressor), ("index", a.indexer.compressor if a.indexer else None)):
            if comp is None:
                continue
            D = comp.wkv.weight.shape[0]
            st = CompressorState(torch.zeros(comp.ratio, D, device=device), torch.zeros(comp.ratio, D, device=device),
                                 store=torch.zeros(16, comp.head_dim, dtype=dtype, device=device))
            setattr(lc, name, st)
        return lc

    return SequenceCache([layer(b) for b in model.layers], 0, [layer(b) for b in model.mtp])

"""Per-sequence decode state of DeepSeek-V4 (architecture.md section 4, "Incremental state").

For each layer: the sliding-window ring of raw K=V entries and, on compressed layers, each
compressor's open window (the projected tokens not yet pooled, plus CSA's previous A half) and
its emitted entries (and the indexer's keys on CSA layers). Everything needed to continue a
sequence exactly is here: prefix-cache blocks and speculative rewinds are snapshots of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quant import fp4_dequant, fp4_quant, fp8_dequant, fp8_quant, pack_fp4, unpack_fp4


def _grow(t: torch.Tensor, need: int) -> torch.Tensor:
    if t.shape[0] >= need:
        return t
    out = t.new_zeros(max(need, t.shape[0] + t.shape[0] // 4, 64), *t.shape[1:])  # grow by 25%
    out[: t.shape[0]] = t
    return out


class EntryStore:
    """Append-only compressed entries [count, dim] in one of three layouts:

    - "dense": the storage dtype (fp32 / bf16);
    - "fp8": the production main-entry layout, FP8 e4m3 nope dims with a UE8M0 scale per 64 and
      BF16 RoPE dims (448 + 7 + 128 = 583 bytes for V4's 512-dim entries);
    - "fp4": the production indexer-key layout, e2m1 packed two per byte with a UE8M0 scale per 32
      (64 + 4 = 68 bytes for 128 dims)."""

    def __init__(self, dim: int, fmt: str = "dense", dtype=torch.float32, device=None, rope_dim: int = 0):
        self.dim, self.fmt, self.dtype, self.rope_dim, self.count = dim, fmt, dtype, rope_dim, 0
        self.version = 0  # bumped by every change of the entries (copies elsewhere can tell they are stale)
        nope = dim - rope_dim
        if fmt == "fp8" and nope % 64:
            raise ValueError(f"cache layout 'fp8' keeps an entry's {nope} non-RoPE dims in FP8 blocks of 64: "
                             f"head_dim - qk_rope_head_dim must be a multiple of 64 (V4: 448); use 'dense'")
        if fmt == "fp4" and dim % 32:
            raise ValueError(f"cache layout 'fp8' keeps indexer keys in FP4 blocks of 32: index_head_dim ({dim}) "
                             f"must be a multiple of 32; use 'dense'")
        z = lambda n, dt: torch.zeros(64, n, dtype=dt, device=device)  # noqa: E731
        if fmt == "dense":
            self.parts = [z(dim, dtype)]
        elif fmt == "fp8":
            self.parts = [z(nope, torch.float8_e4m3fn), z(nope // 64, torch.float8_e8m0fnu), z(rope_dim, torch.bfloat16)]
        elif fmt == "fp4":
            self.parts = [z(dim // 2, torch.int8), z(dim // 32, torch.float8_e8m0fnu)]
        else:
            raise ValueError(f"unknown entry layout {fmt!r} (dense, fp8, fp4)")
        self.bytes_per_entry = sum(t[0].numel() * t.element_size() for t in self.parts)
        self.rows = 64  # allocated

    @staticmethod
    def rows_at(count: int) -> int:
        """An upper bound of the rows allocated for `count` entries (64 at first, then growth by 25%)."""
        return max(64, -(-count * 5 // 4))

    def _encode(self, x: torch.Tensor) -> list:
        if self.fmt == "dense":
            return [x.to(self.dtype)]
        if self.fmt == "fp8":
            nope = self.dim - self.rope_dim
            q, s = fp8_quant(x[:, :nope], 64)
            return [q, s, x[:, nope:].to(torch.bfloat16)]
        codes, s = fp4_quant(x, 32)
        return [pack_fp4(codes), s.to(torch.float8_e8m0fnu)]

    def append(self, x: torch.Tensor) -> None:
        k = x.shape[0]
        if not k:
            return
        for i, part in enumerate(self._encode(x)):
            self.parts[i] = _grow(self.parts[i], self.count + k)
            self.parts[i][self.count:self.count + k] = part
        self.count += k
        self.rows = self.parts[0].shape[0]
        self.version += 1

    def read(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Entries [start, end) decoded to [n, dim] (storage dtype for dense, fp32 otherwise)."""
        end = self.count if end is None else end
        p = [t[start:end] for t in self.parts]
        if self.fmt == "dense":
            return p[0]
        if self.fmt == "fp8":
            return torch.cat([fp8_dequant(p[0], p[1], 64), p[2].float()], dim=-1)
        return fp4_dequant(unpack_fp4(p[0]), p[1].float(), 32)

    def padded(self, rows: int) -> torch.Tensor:
        """Dense layout: the entries as [rows, dim] (rows >= count), the rows past `count` arbitrary. A view
        of the storage where it has room, else a copy: the storage never grows to a longer batch-mate's size."""
        t = self.parts[0]
        if t.shape[0] >= rows:
            return t[:rows]
        out = t.new_zeros(rows, self.dim)
        out[: self.count] = t[: self.count]
        return out

    def truncate(self, count: int) -> None:
        self.count = count
        self.version += 1

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of the entries (allocated=True: of the rows allocated for them). Read every engine step for
        every sequence: kept cheap."""
        return (self.rows if allocated else self.count) * self.bytes_per_entry



@dataclass
class CompressorState:
    """Open window of one compressor and its emitted entries. Rows [0, n % ratio) of buf_* are valid."""

    buf_kv: torch.Tensor  # [ratio, coff*c] fp32 projected tokens of the open window
    buf_gate: torch.Tensor  # [ratio, coff*c] fp32
    prev_kv: torch.Tensor | None = None  # [ratio, c] A halves of the last complete window (CSA); zeros before one
    prev_gate: torch.Tensor | None = None  # [ratio, c], ape included; -inf before the first complete window
    store: EntryStore | None = None  # emitted entries

    @property
    def count(self) -> int:
        return self.store.count

    @count.setter
    def count(self, n: int) -> None:
        self.store.truncate(n)

    @property
    def entries(self) -> torch.Tensor:
        return self.store.read()

    def append(self, new: torch.Tensor) -> None:
        self.store.append(new)

    def nbytes(self, allocated: bool = False) -> int:
        t = [self.buf_kv, self.buf_gate, self.prev_kv, self.prev_gate]
        fixed = sum(x.numel() * x.element_size() for x in t if x is not None)
        return fixed + self.store.nbytes(allocated)



@dataclass
class LayerCache:
    window: torch.Tensor  # [W, c] ring of raw K=V entries, slot = position % W
    comp: CompressorState | None = None
    index: CompressorState | None = None

    def nbytes(self, allocated: bool = False) -> int:
        n = self.window.numel() * self.window.element_size()
        return n + sum(s.nbytes(allocated) for s in (self.comp, self.index) if s is not None)



@dataclass
class SequenceCache:
    """Decode state of one sequence: `n` tokens processed, one LayerCache per main layer (+ MTP layers)."""

    layers: list
    n: int = 0
    mtp: list = field(default_factory=list)
    mtp_n: int = 0  # positions the MTP layer has processed

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of decode state held (allocated=True: including the entry stores' spare capacity)."""
        return sum(c.nbytes(allocated) for c in self.layers + self.mtp)

    def compressors(self) -> list:
        """Every compressor state of its layers (MTP layers included)."""
        return [st for c in self.layers + self.mtp for st in (c.comp, c.index) if st is not None]

    def entry_bytes(self) -> int:
        """Bytes allocated for its compressed entries (spare rows included): the part of the state that grows
        with the context, as a memory budget must count it."""
        return sum(st.store.nbytes(allocated=True) for st in self.compressors())

    def bytes_per_token(self) -> float:
        """Growth of the state per context token: each compressor's entry bytes / its ratio."""
        return sum(st.store.bytes_per_entry / st.buf_kv.shape[0] for st in self.compressors())



def _open_window(comp, rows: int, device) -> dict:
    """Empty open-window tensors of `rows` sequences for one compressor (prev_* only with overlap)."""
    m, c, D = comp.ratio, comp.head_dim, comp.wkv.weight.shape[0]
    z = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
    t = {"buf_kv": z(rows, m, D), "buf_gate": z(rows, m, D)}
    if comp.overlap:
        t |= {"prev_kv": z(rows, m, c), "prev_gate": z(rows, m, c).fill_(float("-inf"))}
    return t


class StatePool:
    """The fixed-size decode state of up to `slots` sequences in shared tensors, one per layer and kind.

    Per main layer: window [S, W, c] (storage dtype) and, per compressor, buf_kv / buf_gate [S, m, coff*c]
    and (CSA) prev_kv / prev_gate [S, m, c], fp32. A SequenceCache made with a pool slot holds views
    of its rows, so every path that updates a cache updates the pool, and a batched decode step can
    gather and scatter the rows of many sequences in a few operations (`model/decode.py`).
    Compressed entries (the part that grows) stay in each sequence's EntryStore."""

    def __init__(self, model, slots: int, dtype: torch.dtype | None = None, device=None):
        cfg = model.config
        self.dtype = dtype or model.dtype
        self.device = device or next(model.parameters()).device
        self.window, self.comp, self.index = [], [], []
        rows = max(slots, 2)  # a one-row pool would have a size-1 dimension, which compiled graphs specialise
        for block in model.layers:
            a = block.attn
            self.window.append(torch.zeros(rows, cfg.sliding_window, cfg.head_dim, dtype=self.dtype,
                                           device=self.device))
            for name, comp in (("comp", a.compressor), ("index", a.indexer.compressor if a.indexer else None)):
                getattr(self, name).append(None if comp is None else _open_window(comp, rows, self.device))
        self.free = list(range(slots - 1, -1, -1))

    def acquire(self) -> int:
        """A free slot, reset to the empty state. Raises if all are taken."""
        if not self.free:
            raise RuntimeError("decode-state pool exhausted (raise EngineConfig.max_num_seqs)")
        s = self.free.pop()
        for w in self.window:
            w[s].zero_()
        for t in self.comp + self.index:
            if t is not None:
                for k, v in t.items():
                    v[s].fill_(float("-inf") if k == "prev_gate" else 0.0)
        return s

    def release(self, slot: int) -> None:
        self.free.append(slot)


def new_cache(model, dtype: torch.dtype | None = None, device=None, layout: str = "dense",
              pool: StatePool | None = None, slot: int | None = None) -> SequenceCache:
    """An empty SequenceCache for `model` (a dsv4 Transformer).

    dtype: storage dtype of the window and dense entries (fp32/bf16). layout "fp8": compressed entries
    in the production layout (FP8 nope + BF16 RoPE) and indexer keys in FP4. With a pool and one of
    its acquired slots, the main layers' fixed-size state are views of that slot's rows."""
    cfg = model.config
    dtype = dtype or model.dtype
    device = device or next(model.parameters()).device
    if layout not in ("dense", "fp8"):
        raise ValueError(f"cache layout must be 'dense' or 'fp8' (got {layout!r})")

    def layer(block, i=None):
        a = block.attn
        pooled = pool is not None and i is not None
        window = (pool.window[i][slot] if pooled
                  else torch.zeros(cfg.sliding_window, cfg.head_dim, dtype=dtype, device=device))
        lc = LayerCache(window)
        for name, comp in (("comp", a.compressor), ("index", a.indexer.compressor if a.indexer else None)):
            if comp is None:
                continue
            fmt = "dense" if layout == "dense" else ("fp8" if name == "comp" else "fp4")
            rows = getattr(pool, name)[i] if pooled else _open_window(comp, 1, device)
            t = {k: v[slot if pooled else 0] for k, v in rows.items()}
            st = CompressorState(store=EntryStore(comp.head_dim, fmt, dtype, device, cfg.qk_rope_head_dim), **t)
            setattr(lc, name, st)
        return lc

    return SequenceCache([layer(b, i) for i, b in enumerate(model.layers)], 0, [layer(b) for b in model.mtp])


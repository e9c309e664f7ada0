"""Prefix cache: decode-state snapshots every `block_size` tokens, keyed by a hash chain over the tokens.

A block snapshot holds, per layer, everything a sequence needs to continue from that boundary
together: the sliding-window tail, each compressor's open window (and CSA's previous A half), and
the entries emitted inside the block (earlier entries come from the parent blocks). Restoring a
chain of blocks therefore reproduces the exact state of a cold run. Blocks live in memory under a
byte cap (LRU) and, optionally, on disk as safetensors files with a checksum ("context caching on
disk"). With `isolate_users`, the chain root includes the user id, so users never share entries.
"""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..model.cache import CompressorState, LayerCache, SequenceCache


def _nbytes(snap: dict) -> int:
    return sum(t.numel() * t.element_size() for t in snap.values())


def _digest(key: str, tensors: dict) -> str:
    """Checksum of a block's tensors under its key (a valid file of another block, renamed, fails it)."""
    h = hashlib.sha256(key.encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode())
        h.update(t.view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def layer_snapshot(lc: LayerCache, start: int, end: int, prefix: str, out: dict) -> None:
    """Record what layer cache `lc` (having processed exactly `end` tokens) holds for block [start, end)."""
    out[f"{prefix}window"] = lc.window.clone()
    for name in ("comp", "index"):
        st = getattr(lc, name)
        if st is None:
            continue
        m = st.buf_kv.shape[0]
        r = end % m
        out[f"{prefix}{name}.buf_kv"] = st.buf_kv[:r].clone()
        out[f"{prefix}{name}.buf_gate"] = st.buf_gate[:r].clone()
        if st.prev_kv is not None:
            out[f"{prefix}{name}.prev_kv"] = st.prev_kv.clone()
            out[f"{prefix}{name}.prev_gate"] = st.prev_gate.clone()
        out[f"{prefix}{name}.entries"] = st.store.read(start // m, end // m).clone()


def restore(template: SequenceCache, blocks: list, n: int) -> SequenceCache:
    """Rebuild a SequenceCache at `n` tokens from a chain of block snapshots (oldest first).

    template: an empty cache of the right shapes (new_cache), filled in place and returned."""
    last = blocks[-1]
    for prefix, lc in [(f"L{i}.", c) for i, c in enumerate(template.layers)] + \
                      [(f"M{i}.", c) for i, c in enumerate(template.mtp)]:
        if f"{prefix}window" not in last:
            continue
        lc.window.copy_(last[f"{prefix}window"])
        for name in ("comp", "index"):
            st: CompressorState = getattr(lc, name)
            if st is None:
                continue
            r = last[f"{prefix}{name}.buf_kv"].shape[0]
            st.buf_kv[:r] = last[f"{prefix}{name}.buf_kv"]
            st.buf_gate[:r] = last[f"{prefix}{name}.buf_gate"]
            if f"{prefix}{name}.prev_kv" in last:
                st.prev_kv.copy_(last[f"{prefix}{name}.prev_kv"])
                st.prev_gate.copy_(last[f"{prefix}{name}.prev_gate"])
            st.count = 0
            for b in blocks:
                st.append(b[f"{prefix}{name}.entries"])
    template.n = n
    template.mtp_n = n  # without an MTP snapshot its window starts empty: drafts degrade, output does not
    return template


class PrefixCache:
    """Blocks of decode state by the hash chain of their tokens: in memory (LRU under max_bytes) and, with
    disk_dir, as checksummed files there (least recently used removed past max_disk_bytes, if given)."""

    STALE_TMP = 3600  # seconds after which a `.tmp` file is a write some killed process left behind

    def __init__(self, block_size: int = 64, max_bytes: int = 1 << 30, disk_dir: str | None = None,
                 isolate_users: bool = False, model_tag: str = "", device: torch.device | str = "cpu",
                 max_disk_bytes: int | None = None):
        if block_size < 1:
            raise ValueError("prefix cache block_size must be >= 1")
        self.block_size, self.max_bytes, self.isolate = block_size, max_bytes, isolate_users
        self.model_tag, self.device = model_tag, torch.device(device)
        self.disk, self.max_disk_bytes = (Path(disk_dir) if disk_dir else None), max_disk_bytes
        if self.disk:
            try:
                self.disk.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"prefix cache directory {self.disk}: {e.strerror}") from None
            self._trim_disk()
        self.blocks: OrderedDict[str, dict] = OrderedDict()
        self.depth: dict[str, int] = {}  # each block's index in its chain
        self.bytes = 0
        self.hits = self.queries = 0

    # ---- keys ----
    def root(self, user: str | None) -> str:
        # isolated: one tree per user id (repr: user None and user "None" differ); shared: one tree for all
        base = f"dsv4|{self.model_tag}|" + (f"user:{user!r}" if self.isolate else "shared")
        return hashlib.sha256(base.encode()).hexdigest()

    def child(self, parent: str, tokens: list) -> str:
        return hashlib.sha256(parent.encode() + struct.pack(f"<{len(tokens)}q", *tokens)).hexdigest()

    # ---- storage ----
    def _put_memory(self, chain: list, snap: dict) -> None:
        """Keep block chain[-1] (chain: the hashes of its chain's blocks, first to last) in memory, LRU."""
        key = chain[-1]
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return
        size = _nbytes(snap)
        while self.bytes + size > self.max_bytes:
            old = next(iter(self.blocks), None)
            # never a block of its own chain: that would leave it unreachable, and a chain longer than the
            # cap would evict its first block, then recompute and re-insert it evicting the next: no hit ever
            if old is None or chain[self.depth[old]:self.depth[old] + 1] == [old]:
                return
            self.bytes -= _nbytes(self.blocks.pop(old))
            del self.depth[old]
        self.blocks[key], self.depth[key] = snap, len(chain) - 1
        self.bytes += size

    def insert(self, chain: list, snap: dict) -> None:
        """Store block chain[-1] (chain: the hashes of its chain's blocks, first to last)."""
        self._put_memory(chain, snap)
        key = chain[-1]
        if self.disk and not (self.disk / f"{key}.safetensors").exists():
            tmp = None
            try:  # a full disk or a read-only directory only costs the disk copy
                fd, tmp = tempfile.mkstemp(dir=self.disk, suffix=".tmp")
                os.close(fd)
                save_file({k: v.contiguous().cpu() for k, v in snap.items()}, tmp,
                          metadata={"sha256": _digest(key, snap)})
                os.replace(tmp, self.disk / f"{key}.safetensors")
                self.disk_bytes += _nbytes(snap)
            except (OSError, SafetensorError):
                pass
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
            if self.max_disk_bytes is not None and self.disk_bytes > self.max_disk_bytes:
                self._trim_disk()

    def _trim_disk(self) -> None:
        """Remove the least recently used block files until the directory holds at most 90% of
        max_disk_bytes (a hit refreshes a file's time), and `.tmp` files of writes killed long ago. Other
        processes sharing the directory may write meanwhile: what is measured is the directory itself."""
        files, now = [], time.time()
        for f in self.disk.iterdir():
            try:
                st = f.stat()
                if f.suffix == ".tmp" and now - st.st_mtime > self.STALE_TMP:
                    f.unlink()
                elif f.suffix == ".safetensors":
                    files.append((st.st_mtime, st.st_size, f))
            except OSError:  # gone meanwhile (another process), or not ours to remove
                pass
        self.disk_bytes = sum(size for _, size, _ in files)
        if self.max_disk_bytes is None or self.disk_bytes <= self.max_disk_bytes:
            return
        for _, size, f in sorted(files):
            if self.disk_bytes <= 0.9 * self.max_disk_bytes:
                break
            try:
                f.unlink()
                self.disk_bytes -= size
            except OSError:
                pass

    def get(self, chain: list) -> dict | None:
        """Block chain[-1] (chain: the hashes of its chain's blocks, first to last), or None."""
        key = chain[-1]
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return self.blocks[key]
        if self.disk is None:
            return None
        f = self.disk / f"{key}.safetensors"
        if not f.exists():
            return None
        try:
            with safe_open(str(f), framework="pt") as h:
                snap = {k: h.get_tensor(k) for k in h.keys()}
                ok = (h.metadata() or {}).get("sha256") == _digest(key, snap)
        except (SafetensorError, OSError, ValueError, RuntimeError):
            ok = False
        if not ok:  # corrupt or tampered: drop it and recompute
            try:
                f.unlink(missing_ok=True)
            except OSError:
                pass
            return None
        try:
            os.utime(f)  # recently used: the last file a trim removes
        except OSError:
            pass
        snap = {k: v.to(self.device) for k, v in snap.items()}
        self._put_memory(chain, snap)
        return snap

    def lookup(self, tokens: list, user: str | None) -> tuple[int, list, list]:
        """Longest cached chain for `tokens`, leaving at least one token to compute.

        Returns (n_tokens, [block snapshots], [block hashes])."""
        self.queries += 1
        key, snaps, hashes = self.root(user), [], []
        B = self.block_size
        for j in range((len(tokens) - 1) // B):
            key = self.child(key, tokens[j * B:(j + 1) * B])
            hashes.append(key)
            snap = self.get(hashes)
            if snap is None:
                hashes.pop()
                break
            snaps.append(snap)
        if snaps:
            self.hits += 1
        return len(snaps) * B, snaps, hashes

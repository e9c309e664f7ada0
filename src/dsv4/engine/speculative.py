"""MTP speculative decoding: draft with the model's own MTP module, verify k drafts in one forward.

Verification feeds [last token, d_1..d_k] as k+1 one-token segments of the sequence, snapshotting
the fixed part of its decode state (window ring, compressor open windows, entry counts) after each;
a rejection rewinds to the snapshot after the last accepted input. Acceptance is the standard
speculative-sampling rule (accept d with probability min(1, p(d)/q(d)), else draw from
norm(max(0, p - q))), which keeps the target distribution; with greedy sampling it reduces to
"accept while the draft equals the argmax", so greedy output equals plain greedy output.
"""
from __future__ import annotations

import torch

from ..model.cache import LayerCache, SequenceCache
from .sampling import draw


def light_snapshot(lc: LayerCache) -> tuple:
    """Fixed-size part of a layer's state; entries are append-only, so their count suffices."""
    comp = []
    for st in (lc.comp, lc.index):
        comp.append(None if st is None else (st.buf_kv.clone(), st.buf_gate.clone(), _clone(st.prev_kv),
                                             _clone(st.prev_gate), st.count))
    return lc.window.clone(), comp


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def light_restore(lc: LayerCache, snap: tuple) -> None:
    window, comp = snap
    lc.window.copy_(window)
    for st, saved in zip((lc.comp, lc.index), comp):
        if st is not None:
            buf_kv, buf_gate, prev_kv, prev_gate, st.count = saved
            for dst, src in ((st.buf_kv, buf_kv), (st.buf_gate, buf_gate), (st.prev_kv, prev_kv),
                             (st.prev_gate, prev_gate)):
                if dst is not None:
                    dst.copy_(src)  # in place: the state may be a view into a StatePool


class Rewind:
    """Hook for one verify segment: records every layer's light snapshot after the segment."""

    def __init__(self):
        self.layers: dict = {}

    def __call__(self, prefix: str, lc: LayerCache) -> None:
        self.layers[prefix] = light_snapshot(lc)

    def restore(self, cache: SequenceCache, n: int) -> None:
        for i, lc in enumerate(cache.layers):
            light_restore(lc, self.layers[f"L{i}."])
        cache.n = n


def accept(target: list, drafts: list, draft_probs: list, greedy: bool, generator) -> tuple[list, int]:
    """target: k+1 probability rows p_0..p_k (p_i: distribution of the token after input i);
    drafts d_1..d_k with their draft distributions q_i. Returns (new tokens, number of drafts accepted)."""
    out = []
    for i, (d, q) in enumerate(zip(drafts, draft_probs)):
        p = target[i]
        if greedy:
            ok = int(p.argmax()) == d
        else:
            u = torch.rand((), generator=generator).item()
            ok = u * q[d].item() < p[d].item()  # u < p/q without dividing by q
        if ok:
            out.append(d)
            continue
        if greedy:
            out.append(int(p.argmax()))
        else:
            residual = (p - q).clamp(min=0)
            total = residual.sum()
            out.append(draw(residual / total if total > 0 else p, generator))
        return out, i
    bonus = target[len(drafts)]
    out.append(int(bonus.argmax()) if greedy else draw(bonus, generator))
    return out, len(drafts)

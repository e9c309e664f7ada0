"""tid2eid tables for the hash-routed MoE layers, built for a tokenizer's token frequencies.

Each token id gets `k` distinct experts. Tokens are placed from the most to the least frequent, each
onto the k experts with the least expected load so far, so the expected load per expert is nearly
uniform on text like the corpus counted (a random table leaves frequent tokens' experts hot).
"""
from __future__ import annotations

import heapq

import numpy as np
import torch


def build_tid2eid(token_counts: np.ndarray, n_experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """token_counts [vocab] (occurrences in a corpus) -> tid2eid [vocab, k] int64, distinct experts per row."""
    if k > n_experts:
        raise ValueError(f"k={k} experts per token exceeds n_experts={n_experts}")
    vocab = len(token_counts)
    rng = np.random.default_rng(seed)
    # ties (e.g. unseen tokens) in random order, so unseen ids do not all land on the same experts
    order = np.lexsort((rng.random(vocab), -np.asarray(token_counts, dtype=np.float64)))
    heap = [(0.0, e) for e in range(n_experts)]
    table = np.zeros((vocab, k), dtype=np.int64)
    for tid in order:
        picked = [heapq.heappop(heap) for _ in range(k)]
        table[tid] = [e for _, e in picked]
        w = float(token_counts[tid]) + 1e-9  # unseen tokens still spread evenly
        for load, e in picked:
            heapq.heappush(heap, (load + w, e))
    return torch.from_numpy(table)


def install_tid2eid(model, token_counts: np.ndarray) -> None:
    """Write a frequency-balanced table into every hash-routed layer of `model` (one table shared)."""
    cfg = model.config
    table = build_tid2eid(token_counts, cfg.n_routed_experts, cfg.num_experts_per_tok)
    with torch.no_grad():
        for block in model.layers:
            if block.ffn.gate.hash:
                block.ffn.gate.tid2eid.copy_(table)

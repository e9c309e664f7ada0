"""tid2eid built from token frequencies balances expert load; rows hold distinct experts."""
import numpy as np
import torch

import dsv4
from dsv4.train.hashing import build_tid2eid, install_tid2eid
from helpers import random_model


def test_frequency_balanced_table_beats_a_random_one():
    rng = np.random.default_rng(0)
    counts = (1e5 / np.arange(1, 513) ** 1.1).round()  # Zipf-like token frequencies
    table = build_tid2eid(counts, n_experts=16, k=2)
    assert table.shape == (512, 2) and all(len(set(r.tolist())) == 2 for r in table)

    def imbalance(t):
        load = np.zeros(16)
        for tid, c in enumerate(counts):
            load[t[tid].numpy()] += c
        return load.max() / load.mean()

    random_table = torch.from_numpy(np.stack([rng.choice(16, 2, replace=False) for _ in range(512)]))
    # no table can do better than the most frequent token's own load over the mean load
    bound = max(1.0, counts.max() / (2 * counts.sum() / 16))
    assert imbalance(table) < 1.1 * bound < imbalance(random_table)


def test_install_into_hash_layers():
    model = random_model(dsv4.Config.tiny(num_hash_layers=2))
    counts = np.ones(512)
    install_tid2eid(model, counts)
    tables = [b.ffn.gate.tid2eid for b in model.layers if b.ffn.gate.hash]
    assert len(tables) == 2 and torch.equal(tables[0], tables[1])
    assert np.bincount(tables[0].flatten().numpy(), minlength=8).tolist() == [128] * 8

"""Shared benchmark helpers: the issue's small random-weight config and an in-process peak-RSS sampler."""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import dsv4
from dsv4.config import CSA, HCA, SLIDING


def GREEDY(n: int) -> dsv4.SamplingParams:
    """n new tokens, greedy, past any end-of-sequence token."""
    return dsv4.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def bench_config(**kw) -> dsv4.Config:
    """hidden 256, 6 layers, 4 heads x 128, q_lora 128, 8 experts top-2, window 64, CSA m=4 top-64, HCA m'=32."""
    base = dict(vocab_size=4096, hidden_size=256, moe_intermediate_size=256, num_hidden_layers=6,
                num_attention_heads=4, head_dim=128, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2,
                o_lora_rank=128, sliding_window=64, layer_types=[SLIDING, CSA, HCA, CSA, HCA, CSA],
                hca_compress_ratio=32, index_n_heads=4, index_head_dim=64, index_topk=64, n_routed_experts=8,
                num_experts_per_tok=2, num_hash_layers=1, original_max_position_embeddings=4096,
                max_position_embeddings=1 << 20)
    return dsv4.Config(**{**base, **kw})


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every 2 ms; `.peak` is the growth over the start, in bytes."""

    def __enter__(self):
        self.start = _rss()
        self.max = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.max = max(self.max, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.max = max(self.max, _rss())
        self.peak = self.max - self.start


def model_pair(cfg: dsv4.Config):
    """The same random weights as a dsv4 model and as transformers' DeepseekV4ForCausalLM (fp32, eval)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from helpers import random_model
    from transformers import DeepseekV4ForCausalLM

    ours = random_model(cfg)
    with tempfile.TemporaryDirectory() as d:
        dsv4.save_model(ours, d)
        ref = DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return ours, ref

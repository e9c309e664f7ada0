"""A 131,072-token context on the CPU: chunked prefill, then decode; peak memory against the KV formula.

Usage: python benchmarks/long_context.py [--tokens 131072] [--layout dense|fp8]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import dsv4  # noqa: E402
from common import PeakRSS  # noqa: E402
from dsv4.config import CSA, HCA, SLIDING  # noqa: E402
from dsv4.engine.engine import LLMEngine  # noqa: E402
from dsv4.footprint import kv_bytes_per_token  # noqa: E402
from helpers import random_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layout", default="dense", choices=["dense", "fp8"])
    ap.add_argument("--chunk", type=int, default=8192, help="prefill tokens per engine step")
    args = ap.parse_args()
    cfg = dsv4.Config(vocab_size=1024, hidden_size=128, moe_intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=2, head_dim=128, qk_rope_head_dim=64, q_lora_rank=64, o_groups=1,
                      o_lora_rank=64, sliding_window=64, layer_types=[SLIDING, CSA, HCA, CSA], hca_compress_ratio=128,
                      index_n_heads=4, index_head_dim=64, index_topk=64, n_routed_experts=4, num_experts_per_tok=2,
                      num_hash_layers=1, max_position_embeddings=1 << 20)
    model = random_model(cfg)
    eng = LLMEngine(model, config=dsv4.EngineConfig(prefix_block=0, max_num_batched_tokens=args.chunk,
                                                    cache_layout=args.layout, kv_budget_bytes=64 << 30))
    prompt = torch.randint(2, 1024, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    seq = eng.add_request(prompt, dsv4.SamplingParams(max_tokens=17, temperature=0, ignore_eos=True))
    with PeakRSS() as mem:
        t = time.perf_counter()
        while seq.num_computed < len(prompt):
            eng.step()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        while eng.has_unfinished() and seq.cache is not None and len(seq.output_ids) < 16:
            eng.step()
        decode = (len(seq.output_ids) - 1) / (time.perf_counter() - t)
        held = seq.cache.nbytes() if seq.cache is not None else float("nan")
        allocated = seq.cache.nbytes(allocated=True) if seq.cache is not None else float("nan")
    n = args.tokens
    # formula: fixed window/compressor state plus per-token growth of each compressor's entries
    conv = {"dense": None, "fp8": "B"}[args.layout]
    per_token = eng.per_token
    formula = eng.fixed_bytes + per_token * n
    print(f"context {n:,} tokens, layout {args.layout}, {torch.get_num_threads()} threads")
    print(f"prefill {prefill:.1f} s ({n / prefill:,.0f} tok/s), decode {decode:.1f} tok/s")
    print(f"decode state held {held / 2**20:.2f} MiB (allocated {allocated / 2**20:.2f} MiB); "
          f"formula {formula / 2**20:.2f} MiB = fixed {eng.fixed_bytes / 2**10:.0f} KiB + {per_token:.2f} B/token "
          f"x {n:,}; held/formula {held / formula:.4f}")
    if conv:
        print(f"architecture formula (convention {conv}) for this config: {kv_bytes_per_token(cfg, conv):.2f} B/token")
    print(f"peak RSS growth during the run {mem.peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

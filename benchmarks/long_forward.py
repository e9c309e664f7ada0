"""Long-context forward on the CPU: dsv4 vs transformers' DeepseekV4ForCausalLM, same weights, one process.

Prints time and peak memory growth per length; transformers runs up to the largest length it
handles within the time limit (its attention is S x S). Usage: python benchmarks/long_forward.py [--max 32768]
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import PeakRSS, bench_config, model_pair  # noqa: E402


def timed(fn, ids):
    gc.collect()
    with PeakRSS() as mem, torch.no_grad():
        t = time.perf_counter()
        fn(ids)
        dt = time.perf_counter() - t
    return dt, mem.peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int, default=32768)
    ap.add_argument("--hf-limit", type=float, default=300.0, help="skip transformers lengths predicted above this (s)")
    ap.add_argument("--hf-mem-gib", type=float, default=14.0, help="... or above this much memory (GiB)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = bench_config()
    ours, ref = model_pair(cfg)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1")
    print(f"{'S':>7} {'dsv4 s':>9} {'dsv4 MiB':>9} {'hf s':>9} {'hf MiB':>9} {'speedup':>8}")
    lengths, S = [], 1024
    while S <= args.max:
        lengths.append(S)
        S *= 2
    hf_ok = True
    for S in lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, S))
        t_ours, m_ours = timed(ours, ids)
        row = f"{S:>7} {t_ours:>9.2f} {m_ours / 2**20:>9.0f}"
        if hf_ok:
            t_hf, m_hf = timed(lambda x: ref(x, use_cache=False, logits_to_keep=0), ids)
            row += f" {t_hf:>9.2f} {m_hf / 2**20:>9.0f} {t_hf / t_ours:>7.1f}x"
            # its attention is S x S: the next (doubled) length costs ~4x the time and memory
            hf_ok = t_hf * 4 < args.hf_limit and m_hf * 4 < args.hf_mem_gib * 2**30
        else:
            row += f" {'-':>9} {'-':>9} {'-':>8}"
        print(row, flush=True)


if __name__ == "__main__":
    main()

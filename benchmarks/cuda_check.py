"""dsv4 on a CUDA GPU: exactness against the CPU and transformers, the engine's features, training, timings.

Checks (fp32, TF32 off, unless said): forward logits on the GPU vs the CPU and vs transformers on the GPU;
engine greedy generation (batched, chunked prefill, prefix-cache hit, MTP speculation, compiled decode)
equal to the CPU engine's tokens; seeded sampling repeats; training steps (fp32 equal to the CPU's loss,
bf16 autocast loss falls, save and resume equal to an uninterrupted run).
Then absolute timings on the GPU, dsv4 and transformers side by side on the issue's benchmark config
(eager; then the compiled decode step and a torch.compiled training step, last as they compile longest).
Every check runs even when an earlier one fails; the last line counts the failures.
Usage: python benchmarks/cuda_check.py [--skip-compile] [--skip-timing]
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import dsv4  # noqa: E402
from common import GREEDY, bench_config, model_pair  # noqa: E402
from dsv4.engine.engine import LLMEngine  # noqa: E402
from dsv4.train import TrainConfig, Trainer  # noqa: E402
from helpers import random_model  # noqa: E402

FAILED = []


def check(name):
    def run(fn):
        t = time.perf_counter()
        try:
            msg = fn()
            print(f"ok    {name}: {msg} ({time.perf_counter() - t:.1f} s)", flush=True)
        except Exception:  # report and go on: one run should show every problem
            FAILED.append(name)
            print(f"FAIL  {name} ({time.perf_counter() - t:.1f} s)\n{traceback.format_exc()}", flush=True)
        return fn
    return run


def prompts(*lengths, seed=0, vocab=4096):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def tokens_of(model, ps, n=24, **opts):
    return [o.token_ids for o in dsv4.LLM(model, **opts).generate(ps, GREEDY(n))]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_sync(fn):
    def wrapped(*a, **k):
        sync()
        t = time.perf_counter()
        out = fn(*a, **k)
        sync()
        return time.perf_counter() - t, out
    return wrapped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    ap.add_argument("--quick", action="store_true", help="short prefills in the timings (dry run)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(args.device)
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}", flush=True)

    # Exactness on the benchmark config with index_topk >= every visible entry: with random weights ~40% of
    # the indexer's k-th scores tie (sums of ReLUs that are exactly 0), and CPU and GPU top-k break ties
    # differently, so a selecting config would compare two equally valid selections.
    cfg = bench_config(index_topk=256)
    cpu, ref = model_pair(cfg)
    gpu = random_model(cfg).to(dev)
    ref = ref.to(dev)
    ids = torch.tensor(prompts(700)[0])[None]

    @check("forward logits, GPU vs CPU and vs transformers on the GPU (700 tokens, fp32)")
    def _():
        with torch.no_grad():
            a = cpu(ids)
            b = gpu(ids.to(dev)).cpu()
            c = ref(ids.to(dev), use_cache=False).logits.float().cpu()
        d1, d2 = (a - b).abs().max().item(), (b - c).abs().max().item()
        assert d1 <= 1e-3 and d2 <= 1e-3, (d1, d2)
        return f"max |GPU - CPU| {d1:.2e}, max |GPU - transformers| {d2:.2e}"

    ps = prompts(5, 150, 333, 70)
    want = tokens_of(cpu, ps)

    @check("engine greedy, batched, GPU tokens == CPU tokens")
    def _():
        got = tokens_of(gpu, ps)
        same = sum(g == w for g, w in zip(got, want))
        assert same == len(ps), f"{same}/{len(ps)} sequences equal"
        return f"{len(ps)} sequences x 24 tokens equal"

    @check("engine chunked prefill (budget 64 tokens per step) on the GPU == CPU tokens")
    def _():
        got = tokens_of(gpu, ps, max_num_batched_tokens=64)
        assert got == want
        return "equal"

    @check("prefix-cache hit on the GPU: same tokens as cold, hits reported")
    def _():
        llm = dsv4.LLM(gpu)
        cold = llm.generate(ps[2], GREEDY(24))
        warm = llm.generate(ps[2], GREEDY(24))
        assert warm.token_ids == cold.token_ids == want[2] and warm.cached_tokens >= 256, warm.cached_tokens
        return f"{warm.cached_tokens} of {len(ps[2])} prompt tokens hit"

    @check("prefix cache on disk, read back by a new engine on the GPU: same tokens")
    def _():
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            dsv4.LLM(gpu, prefix_cache_dir=d).generate(ps[2], GREEDY(24))
            warm = dsv4.LLM(gpu, prefix_cache_dir=d).generate(ps[2], GREEDY(24))
        assert warm.token_ids == want[2] and warm.cached_tokens >= 256, warm.cached_tokens
        return f"{warm.cached_tokens} prompt tokens from disk"

    @check("MTP speculative greedy (k=2) on the GPU == plain greedy")
    def _():
        llm = dsv4.LLM(gpu, num_speculative_tokens=2)
        got = [o.token_ids for o in llm.generate(ps, GREEDY(24))]
        assert got == want
        st = llm.engine.stats
        return f"equal; acceptance {st['accepted']}/{st['proposed']}"

    @check("engine with the FP8/FP4 cache layout on the GPU == the same layout on the CPU")
    def _():
        a = tokens_of(cpu, ps, cache_layout="fp8")
        b = tokens_of(gpu, ps, cache_layout="fp8")
        same = sum(x == y for x, y in zip(a, b))
        assert same == len(ps), f"{same}/{len(ps)} sequences equal"
        return f"{len(ps)} sequences equal"

    tcfg = dict(steps=40, batch_size=8, seq_len=128, warmup=5, lr_muon=0.01, lr_adamw=3e-3)
    corpus = np.random.default_rng(0).integers(2, 512, 200_000).astype(np.int32)
    corpus[1::2] = (corpus[::2] * 7 + 3) % 512  # learnable: every second token follows from the one before

    @check("training step, GPU fp32 loss == CPU loss (same weights, same batch)")
    def _():
        tiny = dsv4.Config.tiny()
        m_cpu, m_gpu = random_model(tiny, seed=3).train(), random_model(tiny, seed=3).train().to(dev)
        la = [Trainer(m_cpu, corpus, TrainConfig(**tcfg)).step()["loss"] for _ in range(1)]
        t = Trainer(m_gpu, corpus, TrainConfig(**tcfg, bf16=False))
        lb = [t.step()["loss"] for _ in range(1)]
        assert abs(la[0] - lb[0]) <= 1e-4 * abs(la[0]), (la, lb)
        return f"CPU {la[0]:.6f}, GPU {lb[0]:.6f}"

    @check("training, bf16 autocast on the GPU: loss falls over 40 steps")
    def _():
        m = random_model(dsv4.Config.tiny(), seed=3).train().to(dev)
        t = Trainer(m, corpus, TrainConfig(**tcfg))
        losses = [t.step()["loss"] for _ in range(40)]
        assert losses[-1] < losses[0] - 0.5, losses
        return f"{losses[0]:.3f} -> {losses[-1]:.3f}"

    @check("training on the GPU, bf16 autocast: save at step 3, resume in a new Trainer == uninterrupted")
    def _():
        import tempfile

        def make():
            torch.manual_seed(0)
            m = random_model(dsv4.Config.tiny(), seed=3).train().to(dev)
            return Trainer(m, corpus, TrainConfig(**{**tcfg, "steps": 6}))
        straight = make()
        want = [straight.step()["loss"] for _ in range(6)]
        with tempfile.TemporaryDirectory() as d:
            first = make()
            got = [first.step()["loss"] for _ in range(3)]
            first.save(Path(d) / "ckpt")
            second = make()
            second.resume(Path(d) / "ckpt")
            got += [second.step()["loss"] for _ in range(3)]
        assert got == want, (got, want)
        return f"6 losses bitwise equal, last {got[-1]:.4f}"

    @check("seeded sampling on the GPU (temperature 0.8, top-p 0.9): a seed gives the same tokens twice")
    def _():
        sp = [dsv4.SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7 + i) for i in range(len(ps))]
        a = [o.token_ids for o in dsv4.LLM(gpu).generate(ps, sp)]
        b = [o.token_ids for o in dsv4.LLM(gpu).generate(ps, sp)]
        assert a == b and all(len(x) == 24 for x in a)
        return f"{len(ps)} seeded sequences repeat; {sum(x != w for x, w in zip(a, want))} differ from greedy"

    if not args.skip_timing:
        bcfg = bench_config()
        _, bref = model_pair(bcfg)
        rows = timings(bcfg, random_model(bcfg).to(dev), bref.to(dev), dev,
                       (1024, 2048) if args.quick else (16384, 65536))
        table(rows)
    if not args.skip_compile:  # last: its compilation takes longest
        @check("compiled decode on the GPU == CPU tokens (first calls compile); eager vs compiled speed")
        def _():
            got = tokens_of(gpu, ps, compile=True)
            assert got == want
            res = {}
            for compile in (False, True):
                for n in (1, 32):
                    rate, eng = decode_rate(gpu, n, 20, compile)
                    res[compile, n] = (rate, kernels_per_step(eng) if dev.type == "cuda" else 0)
            return ("equal; at 1K context (index_topk 256), tok/s and kernel launches per step: " +
                    ", ".join(f"{'compiled' if c else 'eager'} batch {n}: {r:,.1f} ({k:,.0f})"
                              for (c, n), (r, k) in res.items()))

    if not args.skip_compile and not args.skip_timing:
        compiled_training(bcfg, dev, rows)
        table(rows)
    print(f"\n{len(FAILED)} checks failed: {FAILED}" if FAILED else "\nall checks passed", flush=True)


def decode_rate(model, n: int, steps: int, compile: bool = False):
    """-> (decode tokens/s of n sequences at 1K context over `steps` engine steps, the engine)."""
    eng = LLMEngine(model, config=dsv4.EngineConfig(prefix_block=0, compile=compile, max_num_seqs=32,
                                                    max_num_batched_tokens=8192))
    for i in range(n):
        eng.add_request(prompts(1024, seed=i)[0], GREEDY(steps + 20))
    while any(s.num_computed < len(s.prompt) for s in eng.running) or eng.waiting:
        eng.step()
    for _ in range(2):
        eng.step()
    dt, _ = cuda_sync(lambda: [eng.step() for _ in range(steps)])()
    return n * steps / dt, eng


def kernels_per_step(eng, steps: int = 5) -> float:
    """GPU kernel launches per engine step, counted by the profiler (lessons.md: decode was launch-bound)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            eng.step()
        sync()
    return sum(e.count for e in p.key_averages() if str(e.device_type).endswith("CUDA")) / steps


def timings(cfg, gpu, ref, dev, lengths):
    """Absolute GPU timings on the benchmark config (fp32), dsv4 and transformers in this one process."""
    rows = []

    @check("timing: batch-1 decode at 1K context")
    def _():
        eng = LLMEngine(gpu, config=dsv4.EngineConfig(prefix_block=0, max_num_batched_tokens=8192))
        eng.add_request(prompts(1024)[0], GREEDY(60))
        for _ in range(3):
            eng.step()
        dt, _ = cuda_sync(lambda: [eng.step() for _ in range(50)])()
        ours = 50 / dt
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if dev.type == "cuda" else None) as p:
            for _ in range(5):
                eng.step()
            sync()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
        with torch.no_grad():
            out = ref(torch.tensor(prompts(1024)[:1], device=dev), use_cache=True)
            cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                out = ref(tok, cache=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)

            def loop():
                nonlocal tok
                for _ in range(50):
                    o = ref(tok, cache=cache, use_cache=True)
                    tok = o.logits[:, -1:].argmax(-1)
            theirs = 50 / cuda_sync(loop)()[0]
        rows.append(("batch-1 decode tok/s at 1K", f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}x"))
        return f"dsv4 {ours:.1f} tok/s, transformers {theirs:.1f}"

    @check("timing: aggregate decode, 32 concurrent at 1K")
    def _():
        rate, _ = decode_rate(gpu, 32, 30)
        rows.append(("aggregate decode tok/s, 32 concurrent", f"{rate:.0f}", "-", ""))
        return f"{rate:.0f} tok/s"

    for S in lengths:
        @check(f"timing: prefill {S}")
        def _(S=S):
            eng = LLMEngine(gpu, config=dsv4.EngineConfig(prefix_block=0, max_num_batched_tokens=S))
            eng.add_request(prompts(S, seed=5)[0], GREEDY(2))
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt, _ = cuda_sync(eng.step)()
            peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
            theirs = "-"
            if S == lengths[0]:
                with torch.no_grad():
                    x = torch.tensor(prompts(S, seed=5)[:1], device=dev)
                    ref(x[:, :512], use_cache=False, logits_to_keep=1)  # warm
                    try:
                        t2, _ = cuda_sync(lambda: ref(x, use_cache=False, logits_to_keep=1))()
                        theirs = f"{t2:.3f}"
                    except torch.OutOfMemoryError:
                        theirs = "out of memory"
            ratio = f"{float(theirs) / dt:.1f}x" if theirs[0].isdigit() else ""
            rows.append((f"prefill {S} s (dsv4 peak MiB {peak:.0f})", f"{dt:.3f}", theirs, ratio))
            return f"dsv4 {dt:.3f} s, peak {peak:.0f} MiB; transformers {theirs}"

    @check("timing: training step, bf16 autocast, batch 8 x 512")
    def _():
        m = random_model(cfg).train().to(dev)
        r = ref.train()
        ids = torch.randint(2, 4096, (8, 513), device=dev)
        oa, ob = torch.optim.AdamW(m.parameters(), lr=1e-4), torch.optim.AdamW(r.parameters(), lr=1e-4)

        def ours():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].reshape(-1))
            oa.zero_grad()
            loss.backward()
            oa.step()

        def theirs():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = r(ids[:, :-1], labels=ids[:, :-1].clone(), use_cache=False).loss
            ob.zero_grad()
            loss.backward()
            ob.step()
        res = []
        for fn in (ours, theirs):
            fn()
            res.append(8 * 512 * 5 / cuda_sync(lambda: [fn() for _ in range(5)])()[0])
        rows.append(("training tok/s, bf16, 8 x 512", f"{res[0]:,.0f}", f"{res[1]:,.0f}", f"{res[0] / res[1]:.2f}x"))
        return f"dsv4 {res[0]:,.0f} tok/s, transformers {res[1]:,.0f}"

    return rows


def compiled_training(cfg, dev, rows):
    """The training step of `timings` (bf16 autocast, 8 x 512) with the loss torch.compiled, as
    `[train] compile = true` runs it; against the transformers row `timings` measured."""
    @check("timing: training step compiled (torch.compile), bf16 autocast, batch 8 x 512")
    def _():
        m = random_model(cfg).train().to(dev)
        ids = torch.randint(2, cfg.vocab_size, (8, 513), device=dev)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def loss_fn(x, y):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return F.cross_entropy(m(x).flatten(0, 1).float(), y.reshape(-1))
        fn = torch.compile(loss_fn, dynamic=False)

        def step():
            with torch._dynamo.config.patch(capture_scalar_outputs=True):  # as benchmarks/train_bench.py
                loss = fn(ids[:, :-1], ids[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        first, _ = cuda_sync(step)()
        step()
        ours = 8 * 512 * 5 / cuda_sync(lambda: [step() for _ in range(5)])()[0]
        theirs = next((float(r[2].replace(",", "")) for r in rows if r[0].startswith("training")), float("nan"))
        rows.append(("training tok/s, bf16, 8 x 512, compiled", f"{ours:,.0f}", f"{theirs:,.0f}",
                     f"{ours / theirs:.2f}x"))
        return f"{ours:,.0f} tok/s (first step with compilation {first:.0f} s)"


def table(rows):
    print("\n| GPU timing (fp32 unless said) | dsv4 | transformers | ratio |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |", flush=True)


if __name__ == "__main__":
    main()

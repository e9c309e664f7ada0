"""`dsv4 bench`: a checkpoint's speed and decode-state memory in the engine, on this machine.

Prefill of one `context`-token prompt, then decode at each batch size with every sequence at `context`
tokens: aggregate tokens/s, per sequence, and the decode-state bytes the engine holds. Prompts are
random token ids (seeded), sampling is greedy past end-of-sequence, the prefix cache is off, so every
run does the same work. Times are wall-clock in this process: the first decode steps (and with
`compile`, the build or load of the compiled step) are run before the timed ones.
"""
from __future__ import annotations

import time

import torch

from .engine import EngineConfig, LLMEngine, SamplingParams
from .footprint import kv_bytes_per_token


def _prompt(n: int, vocab: int, seed: int) -> list:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model, batch: int, chunk: int, compile: bool, layout: str) -> LLMEngine:
    return LLMEngine(model, config=EngineConfig(prefix_block=0, max_num_seqs=batch, max_num_batched_tokens=chunk,
                                                compile=compile, cache_layout=layout))


def prefill_seconds(model, context: int, layout: str = "dense") -> float:
    """Seconds of the step that prefills one `context`-token prompt (one chunk)."""
    eng = _engine(model, 1, context, False, layout)
    eng.add_request(_prompt(context, model.config.vocab_size, 0),
                    SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    t = time.perf_counter()
    eng.step()
    return time.perf_counter() - t


def decode(model, context: int, batch: int, tokens: int, compile: bool = False, layout: str = "dense") -> dict:
    """`batch` sequences prefilled to `context` tokens, then `tokens` timed decode steps ->
    {"batch", "tok_s" (all sequences), "state_bytes" (decode state held after the steps)}."""
    eng = _engine(model, batch, max(context, 512), compile, layout)
    params = SamplingParams(max_tokens=tokens + 8, temperature=0, ignore_eos=True)  # running to the end
    for i in range(batch):
        eng.add_request(_prompt(context, model.config.vocab_size, i + 1), params)
    while eng.waiting or any(s.num_computed < len(s.prompt) for s in eng.running):
        eng.step()
    for _ in range(2):  # the first decode steps: caches warm, the compiled step built or loaded
        eng.step()
    t = time.perf_counter()
    for _ in range(tokens):
        eng.step()
    rate = batch * tokens / (time.perf_counter() - t)
    return {"batch": batch, "tok_s": rate, "state_bytes": eng.used_bytes()}


def run(model, context: int = 1024, batches=(1, 8, 32), tokens: int = 32, compile: bool = False,
        layout: str = "dense", write=print) -> dict:
    """Measure and `write` a table; -> {"prefill_s", "decode": [decode() per batch], "state_per_token"}."""
    cfg = model.config
    if context + tokens + 8 > cfg.max_position_embeddings:
        raise ValueError(f"context {context:,} + {tokens + 8} decoded tokens exceeds the model's "
                         f"{cfg.max_position_embeddings:,}-token context")
    write(f"dsv4 bench: context {context:,} tokens, {tokens} decode steps per batch size, "
          f"{torch.get_num_threads()} threads, {model.dtype}, entries {layout}{', compiled' if compile else ''}")
    pre = prefill_seconds(model, context, layout)
    write(f"prefill {context:,} tokens: {pre:.3f} s ({context / pre:,.0f} tok/s)")
    write(f"{'batch':>6} {'decode tok/s':>13} {'per sequence':>13} {'state MiB':>10}")
    rows = []
    for b in batches:
        r = decode(model, context, b, tokens, compile, layout)
        rows.append(r)
        write(f"{b:>6} {r['tok_s']:>13,.1f} {r['tok_s'] / b:>13,.1f} {r['state_bytes'] / 2**20:>10.2f}")
    eng = _engine(model, 1, 512, False, layout)
    write(f"decode state per sequence: {eng.fixed_bytes / 2**20:.2f} MiB fixed (windows, open compressor "
          f"windows) + {eng.per_token:.1f} B per context token (V4's production layout: "
          f"{kv_bytes_per_token(cfg, 'A'):.1f} B)")
    return {"prefill_s": pre, "decode": rows, "state_per_token": eng.per_token}

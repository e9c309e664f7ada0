"""The inference engine: continuous batching of chunked prefill and decode over V4 decode state.

Each step the scheduler fills a token budget: one token per decoding sequence, then prefill chunks
(split at prefix-cache block boundaries), then new requests while the memory budget allows.
All scheduled tokens run as one flat batch through `Transformer.step`; sequences whose tokens are
all computed get a sampled token. Requests join and leave between steps; cancellation frees state
at once; when memory runs short the newest sequences are preempted and later recomputed.
"""
from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.cache import new_cache
from ..model.transformer import Transformer
from .prefix_cache import PrefixCache, layer_snapshot, restore
from .sampling import RequestError, SamplingParams, sample
from .sequence import Logprob, RequestOutput, Sequence, Status


@dataclass
class EngineConfig:
    max_num_batched_tokens: int = 2048  # token budget per step
    max_num_seqs: int = 64
    kv_budget_bytes: int = 8 << 30  # decode-state memory budget over all sequences
    cache_dtype: torch.dtype | None = None  # storage dtype of window / entries (default: model dtype)
    max_model_len: int | None = None  # default: config.max_position_embeddings
    prefix_block: int = 64  # prefix-cache granularity in tokens; 0 disables the prefix cache
    prefix_cache_bytes: int = 1 << 30
    prefix_cache_dir: str | None = None  # persist prefix blocks on disk
    isolate_users: bool = False


def model_tag(model: Transformer) -> str:
    """Identity of a model's weights for keying persisted caches (config + a sample of every tensor)."""
    h = hashlib.sha256(json.dumps(model.config.to_hf_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(name.encode() + flat[:: max(1, flat.numel() // 64)].float().numpy().tobytes())
    return h.hexdigest()[:32]


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = config or EngineConfig()
        self.mcfg = model.config
        self.max_len = self.cfg.max_model_len or self.mcfg.max_position_embeddings
        self.dtype = self.cfg.cache_dtype or next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.prefix = None
        if self.cfg.prefix_block:
            self.prefix = PrefixCache(self.cfg.prefix_block, self.cfg.prefix_cache_bytes, self.cfg.prefix_cache_dir,
                                      self.cfg.isolate_users, model_tag(model))
        empty = new_cache(model, self.dtype, self.device)
        self.fixed_bytes = empty.nbytes() - sum(s.store.numel() * s.store.element_size()
                                               for lc in empty.layers + empty.mtp for s in (lc.comp, lc.index) if s)
        self.eos = self.mcfg.eos_token_id
        self.stats = {"steps": 0, "preemptions": 0, "prompt_tokens": 0, "cached_tokens": 0}

    # ---- requests ----
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    user: str | None = None) -> Sequence:
        params = params or SamplingParams()
        ids = self._encode(prompt)
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) + params.max_tokens > self.max_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the maximum "
                               f"context length of {self.max_len} tokens")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        if request_id is not None and request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(ids, params, request_id, user)
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)
        return seq

    def _encode(self, prompt) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("text prompts need a tokenizer; pass token ids")
            return self.tokenizer.encode(prompt).ids
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        ids = list(prompt)
        if not all(isinstance(t, int) and 0 <= t < self.mcfg.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.mcfg.vocab_size})")
        return ids

    def abort(self, request_id: str) -> None:
        seq = self.requests.get(request_id)
        if seq is None or seq.status == Status.FINISHED:
            return
        self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        seq.cache = None  # frees the decode state at once
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.requests.pop(seq.request_id, None)

    # ---- memory ----
    def used_bytes(self) -> int:
        return sum(s.cache.nbytes() for s in self.running if s.cache is not None)

    def estimate_bytes(self, n_tokens: int) -> int:
        """Decode-state bytes of one sequence at n_tokens (window + buffers + entries)."""
        el = torch.finfo(self.dtype).bits // 8
        per = 0.0
        for b in self.model.layers:
            a = b.attn
            if a.compressor is not None:
                per += a.compressor.head_dim * el / a.ratio
            if a.indexer is not None:
                per += a.indexer.head_dim * el / a.ratio
        return int(self.fixed_bytes + per * n_tokens) + 1

    # ---- scheduling ----
    def _admit(self, seq: Sequence) -> None:
        seq.cache = new_cache(self.model, self.dtype, self.device)
        seq.num_computed, seq.block_hashes = 0, []
        if self.prefix is not None:
            n, snaps, hashes = self.prefix.lookup(seq.tokens, seq.user)
            if n:
                restore(seq.cache, snaps, n)
                seq.num_computed, seq.block_hashes = n, hashes
        if not seq.admitted:  # usage counts the first admission (a preempted sequence is recomputed)
            seq.admitted = True
            seq.cached_tokens = min(seq.num_computed, len(seq.prompt))
            self.stats["prompt_tokens"] += len(seq.prompt)
            self.stats["cached_tokens"] += seq.cached_tokens
        seq.status = Status.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.cache, seq.num_computed, seq.status = None, 0, Status.WAITING
        self.waiting.appendleft(seq)
        self.stats["preemptions"] += 1

    def schedule(self) -> list:
        """-> [(seq, n_tokens)] for this step."""
        budget = self.cfg.max_num_batched_tokens
        # keep decode state within the memory budget: preempt the newest sequences
        while self.running and self.used_bytes() > self.cfg.kv_budget_bytes and len(self.running) > 1:
            self._preempt(self.running[-1])
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            need = self.estimate_bytes(len(seq.tokens) + seq.params.max_tokens)
            if self.running and self.used_bytes() + need > self.cfg.kv_budget_bytes:
                break
            if not self.running and need > self.cfg.kv_budget_bytes:
                self.waiting.popleft()
                self.requests.pop(seq.request_id, None)
                seq.status, seq.finish_reason = Status.FINISHED, "error: exceeds the decode-state memory budget"
                continue
            self._admit(self.waiting.popleft())
        plan = []
        for seq in sorted(self.running, key=lambda s: s.pending):  # decodes first, then prefills
            if budget <= 0:
                break
            n = min(seq.pending, budget)
            plan.append((seq, n))
            budget -= n
        return plan

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the sequences that advanced (finished ones included)."""
        plan = self.schedule()
        if not plan:
            return []
        ids, caches, hooks, samplers = [], [], [], []
        B = self.prefix.block_size if self.prefix else 0
        for seq, n in plan:
            start = seq.num_computed
            cuts = [start + n]
            if B:  # split at block boundaries so each completed block can be snapshotted
                cuts = sorted(set(range((start // B + 1) * B, start + n, B)) | {start + n})
            a = start
            for b in cuts:
                ids.append(torch.tensor(seq.tokens[a:b], dtype=torch.long, device=self.device))
                caches.append(seq.cache)
                hooks.append(self._snapshot_hook(seq, b) if B and b % B == 0 else None)
                a = b
            seq.num_computed = start + n
            if seq.num_computed == len(seq.tokens):
                samplers.append((seq, sum(len(t) for t in ids) - 1))
        with torch.no_grad():
            X = self.model.step(ids, caches, hooks)
            if samplers:
                rows = torch.tensor([r for _, r in samplers], device=self.device)
                logits = self.model.logits(X[rows][None])[0]
        for hook in hooks:
            if hook is not None:
                hook.commit()
        self.stats["steps"] += 1
        touched = [seq for seq, _ in plan]
        if samplers:
            self._sample([s for s, _ in samplers], logits)
        return [s.output() for s in touched]

    def _snapshot_hook(self, seq: Sequence, end: int):
        return _BlockRecorder(self, seq, end)

    def _sample(self, seqs: list, logits: torch.Tensor) -> None:
        V = self.mcfg.vocab_size
        for s in seqs:
            if s.counts is None and (s.params.presence_penalty or s.params.frequency_penalty):
                s.counts = torch.zeros(V, device=self.device)
        toks, lps = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], [s.counts for s in seqs])
        for i, (s, t) in enumerate(zip(seqs, toks.tolist())):
            s.tokens.append(t)
            if s.counts is not None:
                s.counts[t] += 1
            if s.logprobs is not None:
                top = lps[i].topk(s.params.logprobs) if s.params.logprobs else None
                alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                s.logprobs.append(Logprob(t, lps[i, t].item(), alts))
            self._check_stop(s, t)

    def _check_stop(self, s: Sequence, t: int) -> None:
        p = s.params
        if self.tokenizer is not None:
            s.text = self.tokenizer.decode(s.output_ids)
            for stop in p.stop:
                at = s.text.find(stop, max(0, s.sent_text - len(stop)))
                if at >= 0:
                    s.text = s.text[:at]
                    return self._finish(s, "stop")
        if (t == self.eos and not p.ignore_eos) or t in p.stop_token_ids:
            return self._finish(s, "stop")
        if len(s.output_ids) >= p.max_tokens or len(s.tokens) >= self.max_len:
            return self._finish(s, "length")


class _BlockRecorder:
    """Collects, layer by layer, the snapshot of `seq` at block boundary `end`; commit() stores it."""

    def __init__(self, engine: LLMEngine, seq: Sequence, end: int):
        self.engine, self.seq, self.end = engine, seq, end
        self.snap: dict = {}

    def __call__(self, layer: int, lc) -> None:  # noqa: D102
        layer_snapshot(lc, self.end - self.engine.prefix.block_size, self.end, f"L{layer}.", self.snap)

    def commit(self) -> None:
        pc, seq, B = self.engine.prefix, self.seq, self.engine.prefix.block_size
        j = self.end // B - 1
        if len(seq.block_hashes) != j:  # chain broken (e.g. restored elsewhere): skip
            return
        parent = seq.block_hashes[-1] if seq.block_hashes else pc.root(seq.user)
        key = pc.child(parent, seq.tokens[self.end - B:self.end])
        seq.block_hashes.append(key)
        pc.insert(key, self.snap)


class LLM:
    """Offline generation: `LLM(path_or_model).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model, tokenizer=None, dtype=torch.float32, device="cpu", **engine_options):
        if isinstance(model, (str, Path)):
            from ..checkpoint import load_model
            path = Path(model)
            model = load_model(path, dtype=dtype, device=device)
            if tokenizer is None and (path / "tokenizer.json").exists():
                from tokenizers import Tokenizer
                tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.engine = LLMEngine(model, tokenizer, EngineConfig(**engine_options))

    def generate(self, prompts, params: SamplingParams | list | None = None, user: str | None = None) -> list:
        """prompts: a list of token-id lists (or strings with a tokenizer), or one of them."""
        single = isinstance(prompts, str) or not len(prompts) or isinstance(prompts[0], int)
        if single:
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        seqs = [self.engine.add_request(p, sp, user=user) for p, sp in zip(prompts, plist)]
        while self.engine.has_unfinished():
            self.engine.step()
        outs = [s.output() for s in seqs]
        return outs[0] if single else outs

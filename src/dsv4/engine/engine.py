"""The inference engine: continuous batching of chunked prefill and decode over V4 decode state.

Each step the scheduler fills a token budget: one token per decoding sequence, then prefill chunks
(split at prefix-cache block boundaries), then new requests while the memory budget allows.
All scheduled tokens run as one flat batch through `Transformer.step`; sequences whose tokens are
all computed get a sampled token. Requests join and leave between steps; cancellation frees state
at once; when memory runs short the newest sequences are preempted and later recomputed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers.decoders import DecodeStream

from ..config import check_fields, is_int
from ..model.cache import EntryStore, StatePool, new_cache
from ..model.decode import BatchDecoder, supports
from ..model.transformer import Transformer
from .prefix_cache import PrefixCache, layer_snapshot, restore
from .sampling import RequestError, SamplingParams, draw, penalised, probs, sample
from .sequence import Logprob, RequestOutput, Sequence, Status
from .speculative import Rewind, accept


_CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    max_num_batched_tokens: int = 2048  # token budget per step
    max_num_seqs: int = 64
    kv_budget_bytes: int = 8 << 30  # decode-state memory budget over all sequences
    cache_dtype: torch.dtype | None = None  # storage dtype of window / entries (default: model dtype)
    cache_layout: str = "dense"  # "fp8": FP8 e4m3 nope + BF16 RoPE entries, FP4 indexer keys
    max_model_len: int | None = None  # default: config.max_position_embeddings
    prefix_block: int = 64  # prefix-cache granularity in tokens; 0 disables the prefix cache
    prefix_cache_bytes: int = 1 << 30
    prefix_cache_dir: str | None = None  # persist prefix blocks on disk
    prefix_cache_disk_bytes: int | None = None  # cap of the blocks on disk (least recently used go first)
    isolate_users: bool = False
    num_speculative_tokens: int = 0  # MTP drafts verified per decode step (0: off)
    compile: bool = False  # compile the batched decode step ahead of time (minutes, once; several x faster)

    def __post_init__(self):
        if isinstance(self.cache_dtype, str):  # a name, as load_model takes dtypes
            self.cache_dtype = _CACHE_DTYPES.get(self.cache_dtype, self.cache_dtype)
        checks = [("cache_dtype", self.cache_dtype is None or self.cache_dtype in _CACHE_DTYPES.values(),
                   f"None (the model's dtype) or one of {', '.join(_CACHE_DTYPES)}, as a name or a torch dtype"),
                  ("max_num_batched_tokens", is_int(self.max_num_batched_tokens, 1), "an integer >= 1"),
                  ("max_num_seqs", is_int(self.max_num_seqs, 1), "an integer >= 1"),
                  ("kv_budget_bytes", is_int(self.kv_budget_bytes, 1), "an integer >= 1"),
                  ("cache_layout", self.cache_layout in ("dense", "fp8"), "'dense' or 'fp8'"),
                  ("max_model_len", self.max_model_len is None or is_int(self.max_model_len, 2),
                   "None or an integer >= 2"),
                  ("prefix_block", is_int(self.prefix_block, 0), "an integer >= 0 (0: no prefix cache)"),
                  ("prefix_cache_bytes", is_int(self.prefix_cache_bytes, 0), "an integer >= 0"),
                  ("prefix_cache_disk_bytes", self.prefix_cache_disk_bytes is None
                   or is_int(self.prefix_cache_disk_bytes, 1), "None or an integer >= 1"),
                  ("num_speculative_tokens", is_int(self.num_speculative_tokens, 0), "an integer >= 0"),
                  ("isolate_users", isinstance(self.isolate_users, bool), "a bool"),
                  ("compile", isinstance(self.compile, bool), "a bool")]
        check_fields("engine option", [(name, getattr(self, name), ok, what) for name, ok, what in checks])


def model_tag(model: Transformer) -> str:
    """Identity of a model's weights for keying persisted caches: config, and per tensor a sample of its
    values and the sum of all its bits (a sample alone missed weights that differ in a few rows)."""
    # every config field: quant_simulation (which to_hf_dict leaves out) changes the state a block holds
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(name.encode() + flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
        h.update(str(_bit_sum(flat)).encode())
    return h.hexdigest()[:32]


def _bit_sum(t: torch.Tensor) -> int:
    """The bytes of 1-D t summed as int64 words (wrapping): exact in any order, at memory speed."""
    b = t.contiguous().view(torch.uint8)
    if b.storage_offset() % 8:
        b = b.clone()
    n = b.numel() // 8 * 8
    return int(b[:n].view(torch.int64).sum()) + int(b[n:].sum())


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = config or EngineConfig()
        self.mcfg = model.config
        self.max_len = self.cfg.max_model_len or self.mcfg.max_position_embeddings
        self.dtype = self.cfg.cache_dtype or model.dtype
        self.device = next(model.parameters()).device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.prefix = None
        if self.cfg.prefix_block:
            # blocks hold decode state as stored: another layout or dtype (same weights) must not hit them, nor
            # on disk (which outlives this engine) another model's; the weights' tag reads every byte, so only then
            tag = f"{model_tag(model) if self.cfg.prefix_cache_dir else ''}|{self.cfg.cache_layout}|" \
                  f"{self.cfg.cache_dtype or model.dtype}"
            self.prefix = PrefixCache(self.cfg.prefix_block, self.cfg.prefix_cache_bytes, self.cfg.prefix_cache_dir,
                                      self.cfg.isolate_users, tag, self.device, self.cfg.prefix_cache_disk_bytes)
        empty = new_cache(model, self.dtype, self.device, self.cfg.cache_layout)
        self.pool = StatePool(model, self.cfg.max_num_seqs, self.dtype, self.device)
        # steps where every scheduled sequence decodes one token go through one batched function
        self.decoder = (BatchDecoder(model, self.pool, self.cfg.compile)
                        if supports(model, self.cfg.cache_layout, self.dtype) else None)
        self.fixed_bytes, self.per_token = empty.nbytes(), empty.bytes_per_token()
        self._stores = [(st.store.bytes_per_entry, st.buf_kv.shape[0]) for st in empty.compressors()]  # (B, ratio)
        self.eos = self.mcfg.eos_token_id
        self.k = self.cfg.num_speculative_tokens
        if self.k and not len(model.mtp):
            raise ValueError("speculative decoding needs the model's MTP module (num_nextn_predict_layers = 0)")
        self.stats = {"steps": 0, "preemptions": 0, "prompt_tokens": 0, "cached_tokens": 0, "proposed": 0,
                      "accepted": 0}

    def warmup(self) -> None:
        """Run the decode step once at batch 1 and once at batch 2 (with `compile`, this compiles both graphs)."""
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        for n in (1, 2):
            for _ in range(n):
                self.add_request([self.mcfg.bos_token_id] * 2, params)
            while self.has_unfinished():
                self.step()
        self.stats = dict.fromkeys(self.stats, 0)

    # ---- requests ----
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    user: str | None = None, constraint=None) -> Sequence:
        """Queue a request. constraint: an output constraint (e.g. JSONObjectConstraint) masking each sample."""
        return self.enqueue(self.new_request(prompt, params, request_id, user, constraint))

    def new_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    user: str | None = None, constraint=None) -> Sequence:
        """A checked request, not queued yet (`enqueue`): RequestError names what is wrong with it."""
        params = params or SamplingParams()
        ids = self._encode(prompt)
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) + params.max_tokens > self.max_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the maximum "
                               f"context length of {self.max_len} tokens")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        seq = Sequence(ids, params, request_id, user)
        seq.constraint = constraint
        return seq

    def enqueue(self, seq: Sequence) -> Sequence:
        """Queue a request made by `new_request`."""
        if seq.request_id in self.requests:
            raise RequestError(f"request id {seq.request_id!r} is already in use")
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)
        return seq

    def _encode(self, prompt) -> list:
        V = self.mcfg.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("text prompts need a tokenizer; pass token ids")
            prompt = self.tokenizer.encode(prompt).ids
            bad = f"the tokenizer gave token ids past the model's vocab_size {V}: the tokenizer does not belong to it"
        else:
            bad = f"prompt token ids must be integers in [0, {V})"
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise RequestError(f"a prompt must be a string or a list of token ids (got {type(prompt).__name__})")
        try:  # numpy and other integer types too, but not floats or bools
            ids = [operator.index(t) for t in prompt if not isinstance(t, bool)]
        except TypeError:
            ids = []
        # checked for text too: an id past the vocab would fail the step, for every batch-mate
        if len(ids) != len(prompt) or not all(0 <= t < V for t in ids):
            raise RequestError(bad)
        return ids

    def abort(self, request_id: str) -> None:
        seq = self.requests.get(request_id)
        if seq is None or seq.status == Status.FINISHED:
            return
        self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, seq: Sequence, reason: str, text_cut: bool = False) -> None:
        if seq.detok is not None and not text_cut:  # the whole output once: includes a trailing partial character
            text = self.tokenizer.decode(seq.output_ids)
            # a stop string ending in that character was never seen by the incremental check: look again there
            at = _first_stop(text, seq.params.stop, len(seq.text)) if reason in ("stop", "length") else None
            seq.text, reason = (text, reason) if at is None else (text[:at], "stop")
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self._free(seq)  # the decode state, at once
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.requests.pop(seq.request_id, None)

    def _free(self, seq: Sequence) -> None:
        seq.cache = None
        if seq.slot is not None:
            self.pool.release(seq.slot)
            seq.slot = None
        if self.decoder is not None:
            self.decoder.drop()  # its batch copy of the entries included this sequence's

    # ---- memory ----
    def used_bytes(self) -> int:
        """Decode-state bytes held: per running sequence the fixed part (window ring, open windows: the same
        for every sequence) and the rows allocated for its entries (walking every state tensor each step cost
        ~1 ms at 32 sequences)."""
        held = [s.cache for s in self.running if s.cache is not None]
        return len(held) * self.fixed_bytes + sum(c.entry_bytes() for c in held)

    def estimate_bytes(self, n_tokens: int) -> int:
        """Decode-state bytes of one sequence at n_tokens (window + buffers + the rows allocated for entries)."""
        return self.fixed_bytes + sum(EntryStore.rows_at(n_tokens // m) * b for b, m in self._stores)

    # ---- scheduling ----
    def _admit(self, seq: Sequence) -> None:
        seq.slot = self.pool.acquire()
        seq.cache = new_cache(self.model, self.dtype, self.device, self.cfg.cache_layout, self.pool, seq.slot)
        seq.num_computed, seq.block_hashes, seq.drafts, seq.draft_q = 0, [], [], []
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
        self._free(seq)
        seq.num_computed, seq.status = 0, Status.WAITING
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
            # its whole decode state: prompt plus every token it may generate (a preempted sequence's tokens
            # already include its output)
            need = self.estimate_bytes(len(seq.prompt) + seq.params.max_tokens)
            if self.running and self.used_bytes() + need > self.cfg.kv_budget_bytes:
                break
            if not self.running and need > self.cfg.kv_budget_bytes:
                self.waiting.popleft()
                self.requests.pop(seq.request_id, None)
                seq.status, seq.finish_reason = Status.FINISHED, "error: exceeds the decode-state memory budget"
                continue
            self._admit(self.waiting.popleft())
        plan = []
        # decodes first, then prefill chunks in admission order (shortest first starved a long prompt for as
        # long as shorter ones kept arriving)
        for seq in sorted(self.running, key=lambda s: s.pending > 1):
            if budget <= 0:
                break
            n = min(seq.pending + (len(seq.drafts) if seq.pending == 1 else 0), budget)
            plan.append((seq, n))
            budget -= n
        return plan

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the outputs of the sequences that advanced (finished ones included)."""
        plan = self.schedule()
        if not plan:
            return []
        ids, caches, hooks, work = [], [], [], []
        B = self.prefix.block_size if self.prefix else 0
        # one token for every sequence and no drafts: the batched decode function (no token tensors needed), if
        # its padded copy of their entries fits beside their state in the memory budget (else one at a time)
        batched = self.decoder is not None and not self.k and all(n == 1 and s.pending == 1 for s, n in plan)
        if batched and (self.decoder.copy_bytes([s.cache for s, _ in plan])
                        > self.cfg.kv_budget_bytes - self.used_bytes()):
            batched = False
            self.decoder.drop()
        for seq, n in plan:
            start = seq.num_computed
            drafts = seq.drafts[: n - 1] if seq.pending == 1 else []
            if not drafts:  # the budget left no room to verify them: stale after this step's token
                seq.drafts, seq.draft_q = [], []
            feed = seq.tokens[start:start + n - len(drafts)] + drafts
            if drafts:  # verify: one-token segments, each leaving a rewind point
                cuts = list(range(start + 1, start + n + 1))
            else:  # split at block boundaries so each completed block can be snapshotted
                cuts = sorted(set(range((start // B + 1) * B, start + n, B)) | {start + n}) if B else [start + n]
            w = _Work(seq, start, len(caches), drafts, cuts)
            a = start
            for b in cuts:
                if not batched:
                    ids.append(torch.tensor(feed[a - start:b - start], dtype=torch.long, device=self.device))
                caches.append(seq.cache)
                hooks.append(w.hook(self, b))
                a = b
            work.append(w)
        with torch.no_grad():
            if batched:
                logits = self.decoder(caches, [w.seq.slot for w in work], [w.seq.tokens[w.start] for w in work],
                                      hooks)
                for j, w in enumerate(work):
                    w.rows = [j]
                need = work
            else:
                X = self.model.step(ids, caches, hooks)
                offsets = torch.tensor([0] + [len(t) for t in ids]).cumsum(0).tolist()
                for w in work:
                    w.rows = list(range(offsets[w.first_segment], offsets[w.first_segment + len(w.cuts)]))
                need = [w for w in work if w.drafts or w.start + len(w.rows) == len(w.seq.tokens)]
                if need:
                    rows = [r for w in need for r in (w.rows if w.drafts else w.rows[-1:])]
                    logits = self.model.logits(X[torch.tensor(rows, device=self.device)][None])[0]
            plain, plain_rows, at = [], [], 0
            for w in need:
                k = len(w.rows) if w.drafts else 1
                if w.drafts:
                    self._verify(w, logits[at:at + k])
                else:
                    plain.append(w.seq)
                    plain_rows.append(at)
                at += k
            for w in work:
                if not w.drafts:
                    w.seq.num_computed = w.start + len(w.rows)
            if plain:
                self._sample(plain, logits[torch.tensor(plain_rows, device=self.device)])
            if self.k:
                self._draft(work, X)
        for w in work:
            w.commit()
        self.stats["steps"] += 1
        return [w.seq.output() for w in work]

    def _verify(self, w: "_Work", logits: torch.Tensor) -> None:
        """Accept a prefix of the drafts (speculative sampling), rewind the rest, append the tokens."""
        seq = w.seq
        self._ensure_counts(seq)
        # row i follows drafts[:i]: its penalties count them too (accepted, if row i is reached)
        rows = [penalised(r, seq.params, _with(seq.counts, w.drafts[:i])) for i, r in enumerate(logits)]
        target = [probs(r, seq.params) for r in rows]
        tokens, a = accept(target, w.drafts, seq.draft_q, seq.params.greedy, seq.generator)
        self.stats["proposed"] += len(w.drafts)
        self.stats["accepted"] += a
        if a < len(w.drafts):
            w.rewinds[a].restore(seq.cache, w.start + a + 1)
        seq.num_computed = w.start + a + 1
        w.rows = w.rows[: a + 1]
        seq.drafts, seq.draft_q = [], []
        lps = torch.log_softmax(torch.stack(rows), -1)
        for i, t in enumerate(tokens):
            self._append(seq, t, lps[i])
            if seq.status == Status.FINISHED:
                break

    def _draft(self, work: list, X: torch.Tensor) -> None:
        """Run the MTP layer over the newly accepted positions, then propose drafts for decoding sequences."""
        live = [w for w in work if w.seq.status != Status.FINISHED and len(w.rows)]
        live = [w for w in live if len(w.seq.tokens) > w.start + len(w.rows)]  # the next token of each row is known
        if not live:
            return
        rows = torch.tensor([r for w in live for r in w.rows], device=self.device)
        nxt, seg_caches, hooks = [], [], []
        for w in live:  # split at the blocks completed in this step: each records the MTP layer at its end
            done = {r.end: r for r in w.recorders if r.end <= w.seq.num_computed}
            a = w.start
            for e in sorted(set(done) | {w.start + len(w.rows)}):
                nxt.append(torch.tensor(w.seq.tokens[a + 1:e + 1], device=self.device))
                seg_caches.append(w.seq.cache)
                hooks.append(done.get(e))
                a = e
        logits, streams = self.model.mtp_step(X[rows], nxt, seg_caches, hooks)
        ends = torch.tensor([len(w.rows) for w in live]).cumsum(0) - 1
        # not drafted: constrained sequences (their verification would need the grammar per draft) and seeded
        # sampled ones (which drafts get verified depends on the step's token budget, so the seed's random
        # stream would too: the same seed must give the same tokens whatever else the engine runs)
        drafting = [(w, int(e)) for w, e in zip(live, ends) if w.seq.pending == 1 and w.seq.constraint is None
                    and (w.seq.params.seed is None or w.seq.params.greedy)]
        if not drafting:
            return
        caches = [w.seq.cache for w, _ in drafting]
        saved = [(c.mtp[0].window.clone(), c.mtp_n) for c in caches]
        cur_logits, cur_streams = logits[[e for _, e in drafting]], streams[[e for _, e in drafting]]
        for depth in range(self.k):
            new = []
            for (w, _), lg in zip(drafting, cur_logits):
                self._ensure_counts(w.seq)
                q = probs(penalised(lg, w.seq.params, _with(w.seq.counts, w.seq.drafts)), w.seq.params)
                d = int(q.argmax()) if w.seq.params.greedy else draw(q, w.seq.generator)
                w.seq.drafts.append(d)
                w.seq.draft_q.append(q)
                new.append(torch.tensor([d], device=self.device))
            if depth + 1 < self.k:  # chain: the MTP layer on its own output and the draft just made
                cur_logits, cur_streams = self.model.mtp_step(cur_streams, new, caches)
        for c, (window, n) in zip(caches, saved):
            c.mtp[0].window.copy_(window)
            c.mtp_n = n

    def _ensure_counts(self, s: Sequence) -> None:
        if s.counts is None and (s.params.presence_penalty or s.params.frequency_penalty):
            s.counts = torch.zeros(self.mcfg.vocab_size, device=self.device)

    def _sample(self, seqs: list, logits: torch.Tensor) -> None:
        for s in seqs:
            self._ensure_counts(s)
        failed = {}  # an output constraint that fails ends its own request, not the step's others
        # logprobs report the model's distribution, not the constraint's mask (as for top-k / top-p)
        unmasked = logits.clone() if any(s.constraint and s.logprobs is not None for s in seqs) else None
        for i, s in enumerate(seqs):
            if s.constraint is not None:
                try:
                    logits[i] = s.constraint.mask(logits[i], s.params.max_tokens - len(s.output_ids))
                except Exception as e:
                    failed[i] = e
        toks, lps = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], [s.counts for s in seqs],
                           unmasked)
        for i, (s, t) in enumerate(zip(seqs, toks.tolist())):
            try:
                if i in failed:
                    raise failed[i]
                self._append(s, t, lps[i] if lps is not None else None)
            except Exception as e:
                self._finish(s, f"error: {e}")

    def _append(self, s: Sequence, t: int, logprobs: torch.Tensor | None) -> None:
        """Record token t; logprobs [V] (None unless s asks for logprobs)."""
        s.tokens.append(t)
        if s.constraint is not None:
            s.constraint.accept(t)
        if s.counts is not None:
            s.counts[t] += 1
        if s.logprobs is not None:
            top = logprobs.topk(s.params.logprobs) if s.params.logprobs else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            s.logprobs.append(Logprob(t, logprobs[t].item(), alts))
        self._check_stop(s, t)
    def _check_stop(self, s: Sequence, t: int) -> None:
        p = s.params
        if self.tokenizer is not None:
            # incremental: re-decoding the whole output every token costs O(n) per token (0.36 ms at 3,700)
            if s.detok is None:
                s.detok = DecodeStream(skip_special_tokens=True)
            chunk = s.detok.step(self.tokenizer, t)  # None while a character's bytes are incomplete
            if chunk:
                start = len(s.text)
                s.text += chunk
                at = _first_stop(s.text, p.stop, start)
                if at is not None:
                    s.text = s.text[:at]
                    return self._finish(s, "stop", text_cut=True)
        if (t == self.eos and not p.ignore_eos) or t in p.stop_token_ids:
            return self._finish(s, "stop")
        if len(s.tokens) - len(s.prompt) >= p.max_tokens or len(s.tokens) >= self.max_len:
            return self._finish(s, "length")


def _first_stop(text: str, stops: list, start: int) -> int | None:
    """Where the earliest stop string in `text` begins, among those ending after text[:start] (which was searched
    already); None if none does. The earliest, not the first listed: the text kept must hold no stop string."""
    hits = [at for stop in stops if (at := text.find(stop, max(0, start - len(stop) + 1))) >= 0]
    return min(hits, default=None)


def _with(counts: torch.Tensor | None, tokens: list) -> torch.Tensor | None:
    """Generated-token counts [V] with `tokens` (drafts ahead of the row being scored) added."""
    if counts is None or not tokens:
        return counts
    return counts + torch.bincount(torch.tensor(tokens, device=counts.device), minlength=counts.shape[0])


class _Work:
    """One sequence's share of a step: its segments, their hooks, and (when verifying) rewind points."""

    def __init__(self, seq: Sequence, start: int, first_segment: int, drafts: list, cuts: list):
        self.seq, self.start, self.first_segment, self.drafts, self.cuts = seq, start, first_segment, drafts, cuts
        self.rows: list = []
        self.rewinds: list = []
        self.recorders: list = []

    def hook(self, engine: "LLMEngine", end: int):
        calls = []
        if self.drafts and end < self.start + len(self.cuts):
            self.rewinds.append(Rewind())
            calls.append(self.rewinds[-1])
        if engine.prefix is not None and end % engine.prefix.block_size == 0:
            self.recorders.append(_BlockRecorder(engine, self.seq, end))
            calls.append(self.recorders[-1])
        return _Hooks(calls) if calls else None

    def commit(self) -> None:
        for r in self.recorders:
            # never a block that holds rejected drafts, nor one past a stop inside accepted drafts
            if r.end <= min(self.seq.num_computed, len(self.seq.tokens)):
                r.commit()


class _Hooks(list):
    def __call__(self, prefix, lc):
        for h in self:
            h(prefix, lc)


class _BlockRecorder:
    """Collects, layer by layer, the snapshot of `seq` at block boundary `end`; commit() stores it."""

    def __init__(self, engine: LLMEngine, seq: Sequence, end: int):
        self.engine, self.seq, self.end = engine, seq, end
        self.snap: dict = {}

    def __call__(self, prefix: str, lc) -> None:
        layer_snapshot(lc, self.end - self.engine.prefix.block_size, self.end, prefix, self.snap)

    def commit(self) -> None:
        pc, seq, B = self.engine.prefix, self.seq, self.engine.prefix.block_size
        j = self.end // B - 1
        if len(seq.block_hashes) != j:  # chain broken (e.g. restored elsewhere): skip
            return
        parent = seq.block_hashes[-1] if seq.block_hashes else pc.root(seq.user)
        key = pc.child(parent, seq.tokens[self.end - B:self.end])
        seq.block_hashes.append(key)
        pc.insert(seq.block_hashes, self.snap)


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
        """prompts: a list of token-id lists (or strings with a tokenizer), or one of them.

        All or nothing: if a prompt is refused or a step fails, none of this call's requests stay queued."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        single = not isinstance(prompts, (list, tuple)) or not prompts or not isinstance(prompts[0], (str, list, tuple))
        if single:
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError(f"{len(plist)} SamplingParams for {len(prompts)} prompts: pass one, or one per prompt")
        seqs = []
        try:
            for p, sp in zip(prompts, plist):
                seqs.append(self.engine.add_request(p, sp, user=user))
            while self.engine.has_unfinished():
                self.engine.step()
        except BaseException:  # a refused prompt, a failed step, Ctrl-C: free this call's requests
            for s in seqs:
                self.engine.abort(s.request_id)
            raise
        outs = [s.output() for s in seqs]
        if self.engine.tokenizer is None:  # no text to give: None rather than an empty string that looks like one
            for o in outs:
                o.text = None
        return outs[0] if single else outs

"""A request in flight: its tokens, decode state, sampling state and output."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

from .sampling import SamplingParams, seeded_generator

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list  # [(token_id, logprob)] alternatives, best first


@dataclass
class RequestOutput:
    """What generate() returns per prompt, and what a stream yields (then `token_ids` / `text` are deltas)."""

    request_id: str
    prompt_token_ids: list
    token_ids: list
    text: str | None
    finished: bool
    # "stop" (eos / stop token / stop string), "length", "abort", or "error: <why>" (a request the engine
    # cannot serve, e.g. "error: exceeds the decode-state memory budget")
    finish_reason: str | None = None
    logprobs: list | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Sequence:
    def __init__(self, prompt: list, params: SamplingParams, request_id: str | None = None, user: str | None = None):
        self.request_id = request_id or f"req-{next(_ids)}"
        self.prompt = list(prompt)
        self.tokens = list(prompt)  # prompt + generated
        self.params = params
        self.user = user
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.cache = None  # SequenceCache once admitted
        self.slot = None  # its row in the engine's StatePool
        self.num_computed = 0  # tokens already in the cache
        self.cached_tokens = 0
        self.admitted = False
        self.block_hashes: list = []  # prefix-cache hash chain of the computed full blocks
        self.drafts: list = []  # MTP draft tokens to verify next step
        self.draft_q: list = []  # their draft distributions
        self.constraint = None  # output constraint (grammar mask), if any
        self.generator = None
        if params.seed is not None:
            self.generator = seeded_generator(params.seed)
        self.counts = None  # generated-token counts for penalties
        self.logprobs: list = [] if params.logprobs is not None else None
        self.text = ""
        self.detok = None  # the engine's incremental detokenizer for this output (tokenizers.DecodeStream)
        self.sent_tokens = 0  # for streaming deltas
        self.sent_text = 0

    @property
    def output_ids(self) -> list:
        return self.tokens[len(self.prompt):]

    @property
    def pending(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self.tokens) - self.num_computed

    def output(self, delta: bool = False) -> RequestOutput:
        ids, text = self.output_ids, self.text
        lps = self.logprobs
        if delta:
            # hold back text that could still turn out to be the start of a stop string
            hold = 0 if self.status == Status.FINISHED else max((len(s) for s in self.params.stop), default=1) - 1
            end = max(self.sent_text, len(text) - hold)
            ids, text = ids[self.sent_tokens:], text[self.sent_text:end]
            lps = None if lps is None else lps[self.sent_tokens:]
            self.sent_tokens, self.sent_text = len(self.output_ids), end
        return RequestOutput(self.request_id, self.prompt, ids, text, self.status == Status.FINISHED,
                             self.finish_reason, lps, self.cached_tokens)

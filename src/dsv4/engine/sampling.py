"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, penalties, seeds, logprobs."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..config import is_int, is_number


GREEDY_BELOW = 1e-5  # temperatures under this are greedy: dividing logits by them overflows to inf


class RequestError(ValueError):
    """A request or its sampling parameters are invalid; the message names the parameter."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below 1e-5, where logits / T overflows) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list = field(default_factory=list)  # strings; need a tokenizer
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N: the chosen token's logprob plus the top N alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        lists = [isinstance(v, (list, tuple)) for v in (self.stop, self.stop_token_ids)]
        self.stop = list(self.stop) if lists[0] else self.stop
        self.stop_token_ids = list(self.stop_token_ids) if lists[1] else self.stop_token_ids
        checks = [
            ("max_tokens", is_int(self.max_tokens, 1), "an integer >= 1"),
            ("temperature", is_number(self.temperature, 0, 100), "a number in [0, 100]"),
            ("top_p", is_number(self.top_p, 0, 1) and self.top_p > 0, "a number in (0, 1]"),
            ("top_k", is_int(self.top_k, 0), "an integer >= 0 (0 = off)"),
            ("seed", self.seed is None or (is_int(self.seed, 0) and self.seed < 2**64),
             "None or an integer in [0, 2**64)"),
            ("logprobs", self.logprobs is None or (is_int(self.logprobs, 0) and self.logprobs <= 20),
             "None or an integer in [0, 20]"),
            ("presence_penalty", is_number(self.presence_penalty, -2, 2), "a number in [-2, 2]"),
            ("frequency_penalty", is_number(self.frequency_penalty, -2, 2), "a number in [-2, 2]"),
            ("stop", lists[0] and all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("stop_token_ids", lists[1] and all(is_int(t, 0) for t in self.stop_token_ids),
             "non-negative token ids"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "a bool"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise RequestError(f"sampling parameter '{name}' must be {what} (got {getattr(self, name)!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def penalised(logits: torch.Tensor, p: SamplingParams, counts: torch.Tensor | None) -> torch.Tensor:
    """logits [..., V] minus frequency * count and presence * [count > 0]."""
    logits = logits.float()
    if counts is not None and (p.presence_penalty or p.frequency_penalty):
        logits = logits - (p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float())
    return logits


def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from: [..., V] penalised logits -> probabilities.

    Greedy (temperature 0) is one-hot on the argmax; otherwise temperature, then top-k, then top-p."""
    if p.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    row = logits / p.temperature
    if p.top_k:
        kth = row.topk(min(p.top_k, row.shape[-1]), dim=-1).values[..., -1:]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1:
        sorted_, order = row.sort(dim=-1, descending=True)
        ps = sorted_.softmax(-1)
        drop = ps.cumsum(-1) - ps >= p.top_p  # keep the smallest prefix whose mass reaches top_p
        row = row.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return row.softmax(-1)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for a request's seed in [0, 2**64). torch's CPU generator keeps only a seed's low 32
    bits (seeds 1 and 2**32 + 1 would draw the same tokens), so a seed of 2**32 or more is hashed to 32 bits;
    a smaller one is used as it is."""
    if seed >= 1 << 32:
        seed = int.from_bytes(hashlib.sha256(seed.to_bytes(8, "little")).digest()[:4], "little")
    return torch.Generator().manual_seed(seed)


def draw(pr: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a probability vector [V]. A seeded draw runs on the CPU, where its generator lives
    (the same tokens for a seed whatever the device)."""
    return int(torch.multinomial(pr.cpu() if generator is not None else pr, 1, generator=generator))


def sample(logits: torch.Tensor, params: list, generators: list, counts: list,
           unmasked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] -> (tokens [B], logprobs [B, V] of the penalised distribution before truncation,
    or None when no request asks for logprobs).

    counts[i]: [V] float counts of the tokens sequence i generated so far (for penalties), or None.
    unmasked: the logits before output constraints masked them, for the logprobs (default: logits)."""
    rows = _penalised_rows(logits, params, counts)
    out = rows.argmax(-1)  # greedy rows, all at once
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = draw(probs(rows[i], p), generators[i])
    if not any(p.logprobs is not None for p in params):
        return out, None
    return out, torch.log_softmax(rows if unmasked is None else _penalised_rows(unmasked, params, counts), -1)


def _penalised_rows(logits: torch.Tensor, params: list, counts: list) -> torch.Tensor:
    if any(c is not None for c in counts):
        return torch.stack([penalised(logits[i], p, c) for i, (p, c) in enumerate(zip(params, counts))])
    return logits.float()

"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, penalties, seeds, logprobs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class RequestError(ValueError):
    """A request or its sampling parameters are invalid; the message names the parameter."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
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
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", 0 <= self.temperature <= 100, "in [0, 100]"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "None or an integer in [0, 20]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "non-negative token ids"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise RequestError(f"sampling parameter '{name}' must be {what} (got {getattr(self, name)!r})")


def sample(logits: torch.Tensor, params: list, generators: list, counts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] fp32 -> (tokens [B], logprobs [B, V] of the sampling distribution before truncation).

    counts[i]: [V] float counts of the tokens sequence i generated so far (for penalties), or None."""
    logits = logits.float().clone()
    for i, (p, c) in enumerate(zip(params, counts)):
        if c is not None and (p.presence_penalty or p.frequency_penalty):
            logits[i] -= p.frequency_penalty * c + p.presence_penalty * (c > 0).float()
    logprobs = torch.log_softmax(logits, -1)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for i, p in enumerate(params):
        row = logits[i]
        if p.temperature == 0:
            out[i] = row.argmax()
            continue
        row = row / p.temperature
        if p.top_k:
            kth = row.topk(min(p.top_k, row.shape[0])).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1:
            sorted_, order = row.sort(descending=True)
            probs = sorted_.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
            row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        out[i] = torch.multinomial(row.softmax(-1), 1, generator=generators[i]).squeeze(0)
    return out, logprobs

"""Constrained decoding with xgrammar: JSON-object output that is valid even when max_tokens runs out.

The grammar mask keeps every sampled token on a path to a valid JSON object. Near the end of the
token budget the constraint steers to the shortest completion: among the tokens the grammar allows,
it prefers closers (end of string, '}', ']', end of sequence), then ':' and short literals, so the
object always closes before max_tokens. With thinking on, the constraint starts after '</think>'.
"""
from __future__ import annotations

import torch

_VOCABS: dict = {}


class _Vocab:
    """Per-tokenizer tables: xgrammar compiler and the token classes used to finish quickly."""

    def __init__(self, tokenizer, eos: int):
        import xgrammar as xgr

        V = tokenizer.get_vocab_size()
        pieces = [tokenizer.id_to_token(i) for i in range(V)]
        info = xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_LEVEL, vocab_size=V, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info)
        self.V, self.eos = V, eos
        texts = [tokenizer.decode([i]) for i in range(V)]
        self.texts = texts
        strip = [t.strip() for t in texts]
        closers = torch.tensor([bool(t) and set(t) <= set("}]") for t in strip])
        closers[eos] = True
        colon = torch.tensor([t == ":" for t in strip])
        short = torch.tensor([t in ("0", "1", "null", "true", "false", '""', "{}", "[]") for t in strip])
        quote = torch.tensor([t.startswith('"') and set(t) <= set('"}]:,') for t in strip])
        self.outside = [closers, colon, short]  # finishing order outside a string
        self.inside = [quote]  # inside a string: end it first


def vocab_for(tokenizer, eos: int) -> _Vocab:
    key = (id(tokenizer), eos)
    if key not in _VOCABS:
        _VOCABS[key] = _Vocab(tokenizer, eos)
    return _VOCABS[key]


class JSONObjectConstraint:
    def __init__(self, tokenizer, eos: int, start_after: int | None = None, schema: str = '{"type": "object"}'):
        import xgrammar as xgr

        self.vocab = vocab_for(tokenizer, eos)
        self.matcher = xgr.GrammarMatcher(self.vocab.compiler.compile_json_schema(schema))
        self.bitmask = xgr.allocate_token_bitmask(1, self.vocab.V)
        self.start_after = start_after
        self.active = start_after is None
        self.depth = 0  # unclosed { and [ outside strings
        self.in_string = self.escape = False

    def mask(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        """logits [V] -> logits with disallowed tokens at -inf (a new tensor)."""
        if not self.active:
            return logits
        import xgrammar as xgr

        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = logits[: self.vocab.V].clone()[None].float()
        xgr.apply_token_bitmask_inplace(row, self.bitmask)
        allowed = torch.isfinite(row[0])
        if remaining <= self.depth + 4:  # steer to the shortest completion
            for prio in (self.vocab.inside if self.in_string else []) + self.vocab.outside:
                cand = allowed & prio
                if cand.any():
                    row[0][~cand] = float("-inf")
                    break
        out = torch.full_like(logits, float("-inf"), dtype=torch.float32)
        out[: self.vocab.V] = row[0]
        return out

    def accept(self, token: int) -> None:
        if not self.active:
            self.active = token == self.start_after
            return
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} violates the output grammar")
        for ch in self.vocab.texts[token]:
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1

"""Corpus building: text/code files -> one token stream (EOS between documents), with fill-in-the-middle
augmentation in DeepSeek's PSM form: <fim_begin> prefix <fim_hole> suffix <fim_end> middle."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..config import ConfigError
from ..tokenizer import FIM_TOKENS


def read_text(path) -> str:
    """A corpus file's text. One that is not UTF-8 (binary, another encoding) is an error naming it, rather than
    replacement characters trained on (or the tokenizer trainer's error, which names no file)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config [data] files: {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                          "convert it, or leave it out with [data] exclude") from None


def fim_transform(text: str, rng: random.Random) -> list:
    """Split at two random points and move the middle to the end (prefix-suffix-middle):
    -> [FIM begin, prefix, FIM hole, suffix, FIM end, middle], markers and text pieces alternating."""
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    return [FIM_TOKENS[0], text[:a], FIM_TOKENS[1], text[b:], FIM_TOKENS[2], text[a:b]]


def build_corpus(files: list, tokenizer, eos: int, fim_rate: float = 0.0, seed: int = 0,
                 max_chars: int = 20_000, bos: int | None = None, starts: list | None = None) -> np.ndarray:
    """Tokenise each file (split into documents of at most max_chars at line breaks) into one int32 stream:
    [BOS] document EOS per document (BOS when given, as V4's prompts start with it). Document text is
    text: a special token's spelling in a file stays characters (as the server encodes user text).
    starts: if a list, receives (file index, token offset) of each file's first token."""
    rng = random.Random(seed)
    out: list = []
    literal = Tokenizer.from_str(tokenizer.to_str())  # a copy that encodes special tokens' spellings as text
    literal.encode_special_tokens = True
    for i, f in enumerate(files):
        if starts is not None:
            starts.append((i, len(out)))
        text = read_text(f)
        docs, cur = [], []
        size = 0
        for line in text.splitlines(keepends=True):
            if size + len(line) > max_chars and cur:
                docs.append("".join(cur))
                cur, size = [], 0
            cur.append(line)
            size += len(line)
        if cur:
            docs.append("".join(cur))
        for doc in docs:
            pieces = fim_transform(doc, rng) if fim_rate and rng.random() < fim_rate else [doc]
            if bos is not None:
                out.append(bos)
            for j, piece in enumerate(pieces):  # with FIM: markers at even places
                out.extend([tokenizer.token_to_id(piece)] if len(pieces) > 1 and j % 2 == 0 else
                           literal.encode(piece).ids)
            out.append(eos)
    return np.asarray(out, dtype=np.int32)

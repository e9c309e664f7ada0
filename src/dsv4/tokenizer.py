"""Byte-level BPE tokenizers carrying DeepSeek-V4's special tokens (built with HF `tokenizers`).

BOS and EOS take ids 0 and 1, as in V4's config; the chat, thinking, DSML and FIM markers follow.
The spellings are deepseek-recipe's defaults, so its prompt rendering and output parsing line up.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

FIM_TOKENS = ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"]


def special_tokens() -> list[str]:
    from deepseek_recipe import SpecialToken as T

    order = [T.Bos, T.Eos, T.ThinkingStart, T.ThinkingEnd, T.System, T.User, T.Assistant, T.LatestReminder,
             T.Dsml, T.Image, T.Ref, T.RefEnd, T.Box, T.BoxEnd, T.Point, T.PointEnd, T.Polygon, T.PolygonEnd]
    return [t.default_str() for t in order] + FIM_TOKENS


def train_tokenizer(files: list, vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE on text files; special tokens first (BOS = 0, EOS = 1)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens(), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    return tok


def load_tokenizer(path) -> Tokenizer:
    """FileNotFoundError when there is no tokenizer.json, ValueError when it is not one."""
    path = Path(path)
    f = path / "tokenizer.json" if path.is_dir() else path
    if not f.exists():
        raise FileNotFoundError(f"{f}: no tokenizer.json")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"{f}: not a tokenizer file ({e})") from None

"""The stand-in model `dsv4 serve` uses until the bundled dsv4-tiny exists.

A small V4 with random weights and a byte-level BPE tokenizer trained on the Python standard
library's source (which ships with the interpreter), built once into a cache directory. It speaks
the API correctly; its text is noise.
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

from ..checkpoint import build_model, init_random, save_model
from ..config import CSA, HCA, SLIDING, Config
from ..tokenizer import train_tokenizer

DEFAULT_DIR = Path(os.environ.get("DSV4_CACHE", Path.home() / ".cache" / "dsv4")) / "dev-model"


def build_dev_model(path: Path = DEFAULT_DIR, vocab_size: int = 4096, seed: int = 0) -> Path:
    """Build (once) and return the directory of the stand-in model."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:200]
    tok = train_tokenizer(files, vocab_size)
    cfg = Config.tiny(vocab_size=tok.get_vocab_size(), hidden_size=128, moe_intermediate_size=128,
                      num_attention_heads=4, head_dim=64, qk_rope_head_dim=16, q_lora_rank=64, o_lora_rank=32,
                      sliding_window=64, layer_types=[SLIDING, CSA, HCA, CSA], hca_compress_ratio=32,
                      index_n_heads=8, index_head_dim=32, index_topk=32, max_position_embeddings=65536,
                      original_max_position_embeddings=4096)
    torch.manual_seed(seed)
    model = init_random(build_model(cfg), std=0.05, seed=seed)
    save_model(model, path)
    tok.save(str(path / "tokenizer.json"))  # written last: its presence marks a complete build
    return path

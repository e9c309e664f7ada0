"""`dsv4 train CONFIG`: tokenizer, corpus, model, training loop, checkpoints, metrics and plots from one TOML.

[model]  preset = "tiny" | "flash" | "pro", plus any Config field (vocab_size comes from the tokenizer)
[data]   files = [globs] (default: the Python standard library), tokenizer = path or omitted to train one,
         vocab_size, fim_rate, val_fraction
[train]  any TrainConfig field, plus out (run directory), checkpoint_every
Writes out/metrics.jsonl, out/loss.png, out/checkpoint/ (resumable) and out/model/ (HF format + tokenizer).
"""
from __future__ import annotations

import glob
import json
import sys
import sysconfig
import tomllib
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import build_model, init_random, save_model
from ..config import Config, ConfigError
from ..tokenizer import load_tokenizer, train_tokenizer
from .data import build_corpus
from .hashing import install_tid2eid
from .trainer import TrainConfig, Trainer


def _files(patterns) -> list:
    if not patterns:
        return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    files = sorted({f for p in patterns for f in glob.glob(p, recursive=True) if Path(f).is_file()})
    if not files:
        raise ConfigError(f"config [data] files: no file matches {patterns}")
    return files


def run_from_config(path, resume: bool = False, stop_after: int | None = None, out=sys.stderr) -> int:
    try:
        spec = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    data, mspec, tspec = spec.get("data", {}), dict(spec.get("model", {})), dict(spec.get("train", {}))
    run = Path(tspec.pop("out", "runs/dsv4"))
    every = int(tspec.pop("checkpoint_every", 50))
    known = {f.name for f in fields(TrainConfig)}
    bad = set(tspec) - known
    if bad:
        raise ConfigError(f"config [train]: unknown fields {sorted(bad)}")
    tcfg = TrainConfig(**tspec)
    run.mkdir(parents=True, exist_ok=True)

    files = _files(data.get("files"))
    if data.get("tokenizer"):
        tok = load_tokenizer(data["tokenizer"])
    elif (run / "tokenizer.json").exists():
        tok = load_tokenizer(run / "tokenizer.json")
    else:
        tok = train_tokenizer(files[: data.get("tokenizer_files", 200)], data.get("vocab_size", 4096))
        tok.save(str(run / "tokenizer.json"))
    preset = mspec.pop("preset", "tiny")
    cfg = {"tiny": Config.tiny, "flash": Config.flash, "pro": Config.pro}[preset](
        **{**mspec, "vocab_size": tok.get_vocab_size()})
    tokens = build_corpus(files, tok, cfg.eos_token_id, data.get("fim_rate", 0.0), tcfg.seed)
    n_val = int(len(tokens) * data.get("val_fraction", 0.02))
    train_tokens, val_tokens = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]

    from .distributed import DataParallel, init

    rank, world = init()  # under torchrun: data parallel over the launched processes
    lead = rank == 0
    torch.manual_seed(tcfg.seed)
    model = init_random(build_model(cfg), seed=tcfg.seed)
    install_tid2eid(model, np.bincount(train_tokens, minlength=cfg.vocab_size))  # balanced hash routing
    trainer = Trainer(model, train_tokens, tcfg, DataParallel(rank, world) if world > 1 else None)
    ckpt = run / "checkpoint"
    if resume and (ckpt.exists() or ckpt.with_name("checkpoint.old").exists()):
        trainer.resume(ckpt)
        out.write(f"dsv4 train: resumed at step {trainer.step_count}\n")
    metrics = run / "metrics.jsonl"
    if not lead:
        pass
    elif trainer.step_count == 0:
        metrics.write_text("")
    else:  # drop lines from steps after the checkpoint (they will be redone identically)
        lines = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= trainer.step_count]
        metrics.write_text("".join(ln + "\n" for ln in lines))
    done_here = 0
    try:
        from tqdm import tqdm
        bar = tqdm(total=tcfg.steps, initial=trainer.step_count, file=out, desc="train") if lead else None
    except ImportError:
        bar = None
    while trainer.step_count < tcfg.steps and (stop_after is None or done_here < stop_after):
        stats = trainer.step()
        done_here += 1
        if trainer.step_count % every == 0 or trainer.step_count == tcfg.steps:
            stats["val_loss"] = validate(model, val_tokens, tcfg)
            if lead:  # every rank holds the same weights
                trainer.save(ckpt)
        if lead:
            with metrics.open("a") as f:
                f.write(json.dumps(stats) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
    if bar is not None:
        bar.close()
    if not lead:
        return 0
    plot(metrics, run / "loss.png")
    if trainer.step_count >= tcfg.steps:
        save_model(model.eval(), run / "model")
        tok.save(str(run / "model" / "tokenizer.json"))
    return 0


@torch.no_grad()
def validate(model, tokens: np.ndarray, cfg: TrainConfig, batches: int = 4) -> float:
    if len(tokens) < cfg.seq_len + 2:
        return float("nan")
    was = model.training
    model.eval()
    losses = []
    n = (len(tokens) - 1) // (cfg.seq_len + 1)
    for i in range(min(batches, n)):
        ids = torch.from_numpy(tokens[i * (cfg.seq_len + 1):(i + 1) * (cfg.seq_len + 1)].astype(np.int64))[None]
        logits = model(ids[:, :-1])
        losses.append(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item())
    model.train(was)
    return float(np.mean(losses))


def plot(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)

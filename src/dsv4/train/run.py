"""`dsv4 train CONFIG`: tokenizer, corpus, model, training loop, checkpoints, metrics and plots from one TOML.

[model]  preset = "tiny" | "flash" | "pro", plus any Config field (vocab_size comes from the tokenizer)
[data]   files = [globs] ("stdlib:" = this interpreter's standard library; default "stdlib:*.py"),
         exclude = [fnmatch patterns], tokenizer = path or omitted to train one,
         vocab_size, fim_rate, val_fraction
[train]  any TrainConfig field, plus out (run directory), checkpoint_every, tensorboard (true: out/tensorboard),
         qat ("fp4" | "fp4+fp8": fake-quantised training, exported also to out/official)
Writes out/metrics.jsonl, out/loss.png, out/checkpoint/ (resumable) and out/model/ (HF format + tokenizer).
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import sys
import sysconfig
import tomllib
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import build_model, init_random, load_model, save_model, save_official
from ..config import Config, ConfigError, check_fields, is_int, is_number
from ..tokenizer import load_tokenizer, train_tokenizer
from .data import build_corpus
from .sft import BOS, EOS
from .hashing import install_tid2eid
from .qat import enable_fp4_qat
from .trainer import TrainConfig, Trainer, autocast


def _files(patterns, exclude=()) -> list:
    """Expand globs; a leading "stdlib:" means relative to this interpreter's standard library.
    exclude: fnmatch patterns on the path relative to the glob's root."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    patterns = patterns or ["stdlib:*.py"]
    found = set()
    for p in patterns:
        root = stdlib if p.startswith("stdlib:") else Path()
        rel = p.removeprefix("stdlib:")
        for f in glob.glob(str(root / rel), recursive=True):
            name = str(Path(f).relative_to(root)) if root != Path() else f
            if Path(f).is_file() and not any(fnmatch.fnmatch(name, x) for x in exclude):
                found.add(f)
    if not found:
        raise ConfigError(f"config [data] files: no file matches {patterns}")
    return sorted(found)


def text_corpus(data: dict, tok, seed: int, starts: list | None = None) -> np.ndarray:
    """The token stream `dsv4 train` builds from a [data] table (files, exclude, fim_rate)."""
    return build_corpus(_files(data.get("files"), data.get("exclude", ())), tok, tok.token_to_id(EOS),
                        data.get("fim_rate", 0.0), seed, bos=tok.token_to_id(BOS), starts=starts)


def train_device(name: str) -> torch.device:
    """[train] device: "auto" is this rank's GPU when there is one (LOCAL_RANK under torchrun), else the CPU."""
    if name == "auto":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config [train] device: {name!r} is not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config [train] device: {name!r}, but this machine has no CUDA GPU")
    return device


def train_end(n_tokens: int, width: int, val_fraction: float) -> int:
    """Where validation starts: the last val_fraction of the whole rows of `width` tokens."""
    return n_tokens - int(n_tokens // width * val_fraction) * width


def _check_data(data: dict) -> None:
    """[data]'s numbers, each named when wrong (before a tokenizer or corpus is built)."""
    from ..tokenizer import special_tokens

    least_vocab = 256 + len(special_tokens())  # the byte alphabet and V4's special tokens
    rules = {"vocab_size": (lambda v: is_int(v, least_vocab), f"an integer >= {least_vocab} (bytes + special tokens)"),
             "tokenizer_files": (lambda v: is_int(v, 1), "an integer >= 1"),
             "examples": (lambda v: is_int(v, 1), "an integer >= 1"),
             "fim_rate": (lambda v: is_number(v, 0, 1), "a number in [0, 1]"),
             "val_fraction": (lambda v: is_number(v, 0, 1, high_open=True), "a number in [0, 1)")}
    check_fields("[data]", [(n, data[n], ok(data[n]), what) for n, (ok, what) in rules.items() if n in data])


def run_from_config(path, resume: bool = False, stop_after: int | None = None, out=None) -> int:
    out = out or sys.stderr
    try:
        spec = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if "rl" in spec:
        return run_rl(spec, out)
    data, mspec, tspec = spec.get("data", {}), dict(spec.get("model", {})), dict(spec.get("train", {}))
    _check_data(data)
    if data.get("mix") is not None:
        from .tasks import check_mix

        check_mix(data["mix"], "[data] mix")
    if mspec.get("preset", "tiny") not in ("tiny", "flash", "pro"):
        raise ConfigError(f"config [model] preset: expected 'tiny', 'flash' or 'pro' (got {mspec['preset']!r})")
    run = Path(tspec.pop("out", "runs/dsv4"))
    every = tspec.pop("checkpoint_every", 50)
    if not is_int(every, 1):
        raise ConfigError(f"config [train] checkpoint_every: must be an integer >= 1 (got {every!r})")
    tensorboard = bool(tspec.pop("tensorboard", False))
    qat = tspec.pop("qat", None)  # "fp4" (routed experts) or "fp4+fp8" (and the official FP8 linears)
    if qat not in (None, "fp4", "fp4+fp8"):
        raise ConfigError(f"config [train] qat: expected 'fp4' or 'fp4+fp8' (got {qat!r})")
    known = {f.name for f in fields(TrainConfig)}
    bad = set(tspec) - known
    if bad:
        raise ConfigError(f"config [train]: unknown fields {sorted(bad)}")
    tcfg = TrainConfig(**tspec)
    run.mkdir(parents=True, exist_ok=True)

    init_from = mspec.pop("init", None)
    if init_from:  # post-training: weights, config and tokenizer of an existing model
        if set(mspec) - {"preset"}:
            raise ConfigError(f"config [model]: with init, no other fields ({sorted(set(mspec) - {'preset'})})")
        tok = load_tokenizer(data.get("tokenizer") or init_from)
    else:
        tok = _tokenizer(data, run)
    mask = None
    if data.get("kind", "text") == "chat":
        tokens, mask = _chat_data(data, tok, tcfg, out)
    elif data.get("kind", "text") == "text":
        tokens = text_corpus(data, tok, tcfg.seed)
    else:
        raise ConfigError(f"config [data] kind: expected 'text' or 'chat' (got {data['kind']!r})")
    cut = train_end(len(tokens), tcfg.seq_len + 1, data.get("val_fraction", 0.02))
    if cut < tcfg.seq_len + 1:  # the trainer would wrap the corpus around inside every row
        raise ConfigError(f"config [data]: {cut:,} training tokens, fewer than one row of [train] seq_len + 1 = "
                          f"{tcfg.seq_len + 1:,}; add files or lower seq_len")
    train_tokens, val_tokens = tokens[:cut], tokens[cut:]
    train_mask = None if mask is None else mask[:cut]
    val_mask = None if mask is None else mask[cut:]
    if mask is not None and data.get("replay"):  # keep pretraining ability: mix in rows of its corpus
        train_tokens, train_mask = _with_replay(train_tokens, train_mask, data, tok, tcfg, out)

    from .distributed import DataParallel, init

    rank, world = init()  # under torchrun: data parallel over the launched processes
    lead = rank == 0
    torch.manual_seed(tcfg.seed)
    if init_from:
        model = load_model(init_from, dtype=torch.float32)
    else:
        preset = mspec.pop("preset", "tiny")
        cfg = {"tiny": Config.tiny, "flash": Config.flash, "pro": Config.pro}[preset](
            **{**mspec, "vocab_size": tok.get_vocab_size()})
        model = init_random(build_model(cfg), seed=tcfg.seed)
        install_tid2eid(model, np.bincount(train_tokens, minlength=cfg.vocab_size))  # balanced hash routing
    if model.config.vocab_size < tok.get_vocab_size():
        raise ConfigError(f"tokenizer has {tok.get_vocab_size()} tokens, model vocab_size {model.config.vocab_size}")
    if qat:
        enable_fp4_qat(model, fp8=qat == "fp4+fp8")
    model.to(train_device(tcfg.device))
    trainer = Trainer(model, train_tokens, tcfg, DataParallel(rank, world) if world > 1 else None, train_mask)
    ckpt = run / "checkpoint"
    if resume and (ckpt.exists() or ckpt.with_name("checkpoint.old").exists()):
        trainer.resume(ckpt)
        out.write(f"dsv4 train: resumed at step {trainer.step_count}\n")
    elif resume:  # e.g. killed before its first checkpoint: nothing is lost by starting over
        out.write(f"dsv4 train: no checkpoint in {run} yet: starting at step 0\n")
    metrics = run / "metrics.jsonl"
    board = _board(run / "tensorboard") if tensorboard and lead else None
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
            stats["val_loss"] = validate(model, val_tokens, tcfg, val_mask)
            if lead:  # every rank holds the same weights
                trainer.save(ckpt)
        if lead:
            with metrics.open("a") as f:
                f.write(json.dumps(stats) + "\n")
            if board is not None:
                for k, v in stats.items():
                    if k != "step" and isinstance(v, (int, float)):
                        board.add_scalar(k, v, stats["step"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
    if bar is not None:
        bar.close()
    if board is not None:
        board.close()
    if not lead:
        return 0
    plot(metrics, run / "loss.png")
    if trainer.step_count >= tcfg.steps:
        save_model(model.eval(), run / "model")
        tok.save(str(run / "model" / "tokenizer.json"))
        if qat:  # the weights exactly as trained, in DeepSeek's packed FP4 / FP8 layout
            save_official(model, run / "official", fp8=qat == "fp4+fp8")
            tok.save(str(run / "official" / "tokenizer.json"))
    return 0


def run_rl(spec: dict, out) -> int:
    """[rl] method = "grpo" | "distill" (teacher = model dir), eval_examples, eval_every, eval_mix (the held-out
    task kinds, by default the training mix);
    [model] init = model dir; [train] out plus RLConfig fields. Held-out accuracy before, during, after."""
    from .rl import GRPO, Distill, RLConfig, evaluate, heldout
    from .sft import ChatRenderer
    from .tasks import check_mix

    rl, tspec = dict(spec["rl"]), dict(spec.get("train", {}))
    init_from = spec.get("model", {}).get("init")
    if not init_from:
        raise ConfigError("config [model] init: post-training needs a model directory to start from")
    run = Path(tspec.pop("out", "runs/dsv4-rl"))
    known = {f.name for f in fields(RLConfig)}
    if set(tspec) - known:
        raise ConfigError(f"config [train]: unknown fields {sorted(set(tspec) - known)}")
    cfg = RLConfig(**tspec)
    method = rl.get("method")
    if method not in ("grpo", "distill"):
        raise ConfigError(f"config [rl] method: expected 'grpo' or 'distill' (got {method!r})")
    torch.manual_seed(cfg.seed)
    renderer = ChatRenderer(init_from)
    model = load_model(init_from, dtype=torch.float32)
    if method == "grpo":
        algo = GRPO(model, renderer, cfg)
    else:
        if not rl.get("teacher"):
            raise ConfigError("config [rl] teacher: distillation needs a teacher model directory")
        algo = Distill(model, load_model(rl["teacher"], dtype=torch.float32), renderer, cfg)
    for name, default, least in (("eval_examples", 100, 1), ("eval_every", 0, 0)):
        if not is_int(rl.get(name, default), least):
            raise ConfigError(f"config [rl] {name}: must be an integer >= {least} (got {rl[name]!r})")
    if rl.get("eval_mix") is not None:
        check_mix(rl["eval_mix"], "[rl] eval_mix")
    tests = heldout(rl.get("eval_examples", 100), rl.get("eval_mix") or cfg.mix)
    every = rl.get("eval_every", 0) or cfg.steps
    run.mkdir(parents=True, exist_ok=True)
    metrics = run / "metrics.jsonl"
    before = evaluate(model, renderer, tests, cfg.max_tokens)
    rows = [{"step": 0, "heldout": before}]
    out.write(f"dsv4 train ({method}): held-out accuracy before {before}\n")
    from tqdm import tqdm
    for _ in tqdm(range(cfg.steps), file=out, desc=method):
        stats = algo.step()
        if algo.step_count % every == 0 or algo.step_count == cfg.steps:
            stats["heldout"] = evaluate(model, renderer, tests, cfg.max_tokens)
            out.write(f"step {algo.step_count}: held-out {stats['heldout']}\n")
        rows.append(stats)
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_model(model.eval(), run / "model")
    renderer.tokenizer.save(str(run / "model" / "tokenizer.json"))
    after = rows[-1]["heldout"]
    out.write(f"dsv4 train ({method}): held-out accuracy {before['all']:.3f} -> {after['all']:.3f}, "
              f"reward {before['reward']:.3f} -> {after['reward']:.3f}\n")
    return 0


def _tokenizer(data: dict, run: Path):
    """The configured tokenizer, the run's own, or a new BPE trained on the [data] files."""
    if data.get("tokenizer"):
        return load_tokenizer(data["tokenizer"])
    if (run / "tokenizer.json").exists():
        return load_tokenizer(run / "tokenizer.json")
    files = _files(data.get("files"), data.get("exclude", ()))
    tok = train_tokenizer(files[: data.get("tokenizer_files", 200)], data.get("vocab_size", 4096))
    tok.save(str(run / "tokenizer.json"))
    return tok


def _chat_data(data: dict, tok, tcfg: TrainConfig, out) -> tuple[np.ndarray, np.ndarray]:
    """[data] kind = "chat": generated tasks (dsv4.train.tasks) rendered by deepseek-recipe,
    loss on assistant turns. Fields: examples (task draws), mix (kind -> weight)."""
    import tempfile

    from .sft import ChatRenderer, build_sft_corpus
    from .tasks import generate

    with tempfile.TemporaryDirectory() as d:  # the renderer reads a tokenizer file
        tok.save(str(Path(d) / "tokenizer.json"))
        renderer = ChatRenderer(Path(d) / "tokenizer.json")
    examples = generate(data.get("examples", 2000), tcfg.seed, "train", data.get("mix"))
    tokens, mask, dropped = build_sft_corpus(examples, renderer, tcfg.seq_len, tok.token_to_id(EOS), tcfg.seed)
    out.write(f"dsv4 train: {len(examples)} chat examples, {int(mask.sum())} target tokens in "
              f"{len(tokens) // (tcfg.seq_len + 1)} rows ({dropped} too long, dropped)\n")
    return tokens, mask


def _with_replay(tokens: np.ndarray, mask: np.ndarray, data: dict, tok, tcfg: TrainConfig, out):
    """[data] replay = fraction, replay_from = a pretraining config: add fraction x (chat rows) rows of that
    config's corpus (same files, FIM and split; training part only), loss on every token; rows shuffled."""
    if not data.get("replay_from"):
        raise ConfigError("config [data] replay needs replay_from = the pretraining config to draw text from")
    try:
        pre = tomllib.loads(Path(data["replay_from"]).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config [data] replay_from: {e}") from None
    pdata, ptrain = pre.get("data", {}), pre.get("train", {})
    text = text_corpus(pdata, tok, ptrain.get("seed", 0))
    text = text[: train_end(len(text), ptrain.get("seq_len", 128) + 1, pdata.get("val_fraction", 0.02))]
    width = tcfg.seq_len + 1
    rows = len(tokens) // width
    n = int(rows * float(data["replay"]))
    rng = np.random.default_rng(tcfg.seed)
    starts = rng.integers(0, len(text) - width, n)
    extra = np.stack([text[s:s + width] for s in starts]).astype(np.int32)
    all_rows = np.concatenate([tokens.reshape(rows, width), extra])
    all_mask = np.concatenate([mask.reshape(rows, width), np.ones_like(extra, dtype=np.uint8)])
    order = rng.permutation(len(all_rows))
    out.write(f"dsv4 train: {n} rows of {data['replay_from']}'s corpus mixed in\n")
    return all_rows[order].reshape(-1), all_mask[order].reshape(-1)


def _board(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("config [train] tensorboard = true needs the tensorboard package "
                          "(pip install tensorboard)") from None
    return SummaryWriter(str(path))


@torch.no_grad()
def validate(model, tokens: np.ndarray, cfg: TrainConfig, mask: np.ndarray | None = None,
             batches: int = 4) -> float:
    """Mean next-token loss over the first `batches` rows of seq_len + 1 tokens (mask: targets counted)."""
    width = cfg.seq_len + 1
    n = len(tokens) // width
    if n == 0:
        return float("nan")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for i in range(min(batches, n)):
        ids = torch.from_numpy(tokens[i * width:(i + 1) * width].astype(np.int64))[None].to(device)
        with autocast(device, cfg.bf16):
            logits = model(ids[:, :-1])[0]
        ce = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="none")
        w = torch.ones_like(ce) if mask is None else \
            torch.from_numpy(mask[i * width + 1:(i + 1) * width].astype(np.float32)).to(device)
        total += float((ce * w).sum())
        count += float(w.sum())
    model.train(was)
    return total / max(count, 1.0)


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

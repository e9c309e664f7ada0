"""`dsv4 train CONFIG`: tokenizer, corpus, model, training loop, checkpoints, metrics and plots from one TOML
or YAML file (by its suffix: .yaml / .yml are YAML, anything else TOML) of these tables:

[model]  preset = "tiny" | "flash" | "pro", plus any Config field (vocab_size, bos/eos_token_id come from the
         tokenizer); or init = a model directory alone (post-training)
[data]   files = a glob or [globs] ("stdlib:" = this interpreter's standard library; default "stdlib:*.py"),
         exclude = [fnmatch patterns], tokenizer = path or omitted to train one (with vocab_size and
         tokenizer_files), fim_rate (kind "text"), val_fraction; kind = "chat" with examples, mix, replay, replay_from
[train]  any TrainConfig field, plus out (run directory), checkpoint_every, tensorboard (true: out/tensorboard),
         qat ("fp4" | "fp4+fp8": fake-quantised training, exported also to out/official)
Writes out/metrics.jsonl, out/loss.png, out/checkpoint/ (resumable) and out/model/ (HF format + tokenizer).
An unknown section or field is an error naming it: misspelt, it would otherwise be ignored and its default used;
so is a field the run's kind or method never reads. --resume refuses a run whose settings differ from its
checkpoint's, naming each (`trainer.Checkpointed`; for replay, what replay_from's corpus is made of), except out,
checkpoint_every, tensorboard, [rl] eval_every, device, compile, and steps while the steps taken keep their
learning rate (a longer run before its decay).
"""
from __future__ import annotations

import fnmatch
import glob
import importlib.util
import json
import math
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
from ..tokenizer import FIM_TOKENS, load_tokenizer, train_tokenizer
from .data import build_corpus, read_text
from .sft import BOS, EOS
from .hashing import install_tid2eid
from .qat import enable_fp4_qat
from .trainer import TrainConfig, Trainer, autocast


def _globs(value, name: str) -> list:
    """[data] files / exclude as a list: a lone string is one pattern (not a list of its characters)."""
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, (list, tuple)) and all(isinstance(p, str) and p for p in value)):
        raise ConfigError(f"config [data] {name}: must be a glob or a list of globs (got {value!r})")
    return list(value)


def _files(patterns, exclude=()) -> list:
    """Expand globs; a leading "stdlib:" means relative to this interpreter's standard library.
    exclude: fnmatch patterns on the path relative to the glob's root (its directories before the first wildcard)."""
    patterns = ["stdlib:*.py"] if patterns is None else _globs(patterns, "files")
    if not patterns:
        raise ConfigError("config [data] files: an empty list; give globs, or leave files out for the default "
                          "(the standard library's top-level modules)")
    exclude = _globs(exclude, "exclude")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = set()
    for p in patterns:
        base = stdlib if p.startswith("stdlib:") else Path()
        parts = Path(p.removeprefix("stdlib:")).parts
        fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
        root = base.joinpath(*parts[:fixed])
        for f in glob.glob(str(base.joinpath(*parts)), recursive=True):
            name = str(Path(f).relative_to(root))
            if Path(f).is_file() and not any(fnmatch.fnmatch(name, x) for x in exclude):
                found.add(f)
    if not found:
        raise ConfigError(f"config [data] files: no file matches {patterns}")
    return sorted(found)


def text_corpus(data: dict, tok, seed: int, starts: list | None = None) -> np.ndarray:
    """The token stream `dsv4 train` builds from a [data] table (files, exclude, fim_rate)."""
    return build_corpus(_files(data.get("files"), data.get("exclude", ())), tok, tok.token_to_id(EOS),
                        data.get("fim_rate", DATA_DEFAULTS["fim_rate"]), seed, bos=tok.token_to_id(BOS), starts=starts)


def train_device(name: str) -> torch.device:
    """[train] device: "auto" is this rank's GPU when there is one (LOCAL_RANK under torchrun), else the CPU."""
    if name == "auto":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config [train] device: {name!r} is not a device") from None
    if device.type not in ("cpu", "cuda"):  # e.g. mps, meta: not what training runs on here
        raise ConfigError(f"config [train] device: {name!r}: dsv4 trains on the CPU or a CUDA GPU; expected auto, "
                          "cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config [train] device: {name!r}, but this machine has no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"config [train] device: {name!r}, but this machine has {torch.cuda.device_count()} "
                          "CUDA GPU(s)")
    return device


def train_end(n_tokens: int, width: int, val_fraction: float) -> int:
    """Where validation starts: the last val_fraction of the whole rows of `width` tokens."""
    return n_tokens - int(n_tokens // width * val_fraction) * width


DATA_FIELDS = ("files", "exclude", "tokenizer", "tokenizer_files", "vocab_size", "fim_rate", "val_fraction", "kind",
               "examples", "mix", "replay", "replay_from")
DATA_DEFAULTS = {"files": None, "exclude": [], "tokenizer": None, "tokenizer_files": 200, "vocab_size": 4096,
                 "fim_rate": 0.0, "val_fraction": 0.02, "kind": "text", "examples": 2000, "mix": None, "replay": 0.0,
                 "replay_from": None}  # files None: the standard library's top-level modules
KIND_FIELDS = {"chat": ("examples", "mix", "replay", "replay_from"), "text": ("fim_rate",)}  # read by that kind only
RUN_TABLES = {"model": ("preset", "init", *(f.name for f in fields(Config))), "data": DATA_FIELDS,
              "train": ("out", "checkpoint_every", "tensorboard", "qat", *(f.name for f in fields(TrainConfig)))}
RL_FIELDS = ("method", "teacher", "eval_examples", "eval_every", "eval_mix")


def _tables(spec: dict, known: dict) -> list:
    """spec's tables in the order of known (section -> its fields), {} for an absent one. An unknown section or
    field is an error naming it: misspelt, it would otherwise be ignored and its default silently used."""
    for name in spec:
        if name not in known:
            raise ConfigError(f"config [{name}]: unknown section; expected {', '.join(f'[{k}]' for k in known)}")
    tables = []
    for section, names in known.items():
        table = spec.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"config [{section}]: must be a table (got {table!r})")
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise ConfigError(f"config [{section}]: unknown field {', '.join(unknown)}; expected one of "
                              f"{', '.join(sorted(names))}")
        tables.append(dict(table))
    return tables


def _run_dir(run: Path) -> Path:
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. out names an existing file
        raise ConfigError(f"config [train] out: cannot make the run directory {run} ({e.strerror})") from None
    return run


def _model_dir(path, where: str) -> Path:
    """A model directory named in the config, checked before any work: the loaders' errors name no field."""
    p = Path(path) if isinstance(path, str) else None
    if p is None or not (p / "tokenizer.json").is_file():
        raise ConfigError(f"config {where}: {path} is not a model directory with a tokenizer.json "
                          "(such as a run's out/model)")
    return p


def _load_tokenizer(path, where: str):
    """A tokenizer.json named by a config field, with the special tokens training writes into the stream
    (BOS and EOS around documents, the FIM markers)."""
    try:
        tok = load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config {where}: {e}") from None
    missing = [t for t in (BOS, EOS, *FIM_TOKENS) if tok.token_to_id(t) is None]
    if missing:
        raise ConfigError(f"config {where}: {path} has no {', '.join(missing)} token; dsv4 trains with V4's special "
                          "tokens (BOS, EOS, FIM markers): use a tokenizer dsv4 trained (leave [data] tokenizer out "
                          "to train one) or a dsv4 model's tokenizer.json")
    return tok


def _check_data(data: dict) -> None:
    """[data]'s numbers, each named when wrong (before a tokenizer or corpus is built)."""
    from ..tokenizer import special_tokens

    least_vocab = 256 + len(special_tokens())  # the byte alphabet and V4's special tokens
    rules = {"vocab_size": (lambda v: is_int(v, least_vocab), f"an integer >= {least_vocab} (bytes + special tokens)"),
             "tokenizer_files": (lambda v: is_int(v, 1), "an integer >= 1"),
             "examples": (lambda v: is_int(v, 1), "an integer >= 1"),
             "fim_rate": (lambda v: is_number(v, 0, 1), "a number in [0, 1]"),
             "val_fraction": (lambda v: is_number(v, 0, 1, high_open=True), "a number in [0, 1)"),
             "replay": (is_number, "a number >= 0 (a fraction of the chat rows)"),
             "tokenizer": (lambda v: isinstance(v, str), "a path to a tokenizer.json"),
             "replay_from": (lambda v: isinstance(v, str), "a path to a pretraining config")}
    check_fields("[data]", [(n, data[n], ok(data[n]), what) for n, (ok, what) in rules.items() if n in data])
    _check_trained_tokenizer(data, "tokenizer" in data and f"[data] tokenizer gives one ({data['tokenizer']})")
    kind = data.get("kind", DATA_DEFAULTS["kind"])
    if kind not in KIND_FIELDS:
        raise ConfigError(f"config [data] kind: expected 'text' or 'chat' (got {kind!r})")
    for other, names in KIND_FIELDS.items():  # a field the run's kind never reads: refused rather than ignored
        unused = [n for n in names if n in data] if other != kind else []
        if unused:
            raise ConfigError(f"config [data] {unused[0]}: read only by kind = {other!r}, and this corpus is "
                              f"kind = {kind!r}; remove it")


def _check_trained_tokenizer(data: dict, why) -> None:
    """vocab_size and tokenizer_files say how to train a tokenizer: refused (rather than ignored) when `why`
    says the run trains none."""
    for name in ("vocab_size", "tokenizer_files"):
        if why and name in data:
            raise ConfigError(f"config [data] {name}: read only when a tokenizer is trained, and {why}; remove it")


def read_config(path, where: str = "") -> dict:
    """A run config file as tables: YAML for a .yaml / .yml suffix, else TOML. Errors name the file (after
    `where`, the field that named it)."""
    path = Path(path)
    kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "TOML"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}{path}: not a {kind} file (not UTF-8 text)") from None
    except OSError as e:
        raise ConfigError(f"{where}{path}: {e.strerror}") from None
    if kind == "YAML":
        import yaml

        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:  # it says where
            raise ConfigError(f"{where}{path}: not valid YAML: {e}") from None
        spec = {} if spec is None else spec  # an empty file: every default
    else:
        try:
            spec = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where}{path}: not valid TOML: {e}") from None
    if not (isinstance(spec, dict) and all(isinstance(k, str) for k in spec)):
        raise ConfigError(f"{where}{path}: a config is a mapping of tables (model, data, train, rl), "
                          f"not {type(spec).__name__} {spec!r:.60}")
    return spec


def run_from_config(path, resume: bool = False, stop_after: int | None = None, out=None) -> int:
    out = out or sys.stderr
    if stop_after is not None and not is_int(stop_after, 1):
        raise ConfigError(f"--stop-after: must be a number of steps >= 1 (got {stop_after})")
    spec = read_config(path)
    if "rl" in spec:
        return run_rl(spec, out, resume, stop_after)
    mspec, data, tspec = _tables(spec, RUN_TABLES)
    for name, how in (("vocab_size", "; give [data] vocab_size instead"), ("bos_token_id", " (its BOS token's id)"),
                      ("eos_token_id", " (its EOS token's id)")):
        if name in mspec:
            raise ConfigError(f"config [model] {name}: set by the tokenizer{how}")
    _check_data(data)
    replay_source = _replay_source(data)
    if data.get("mix") is not None:
        from .tasks import check_mix

        check_mix(data["mix"], "[data] mix")
    if mspec.get("preset", "tiny") not in ("tiny", "flash", "pro"):
        raise ConfigError(f"config [model] preset: expected 'tiny', 'flash' or 'pro' (got {mspec['preset']!r})")
    run = Path(tspec.pop("out", "runs/dsv4"))
    every = tspec.pop("checkpoint_every", 50)
    if not is_int(every, 1):
        raise ConfigError(f"config [train] checkpoint_every: must be an integer >= 1 (got {every!r})")
    tensorboard = tspec.pop("tensorboard", False)
    if not isinstance(tensorboard, bool):  # bool("false") would be true
        raise ConfigError(f"config [train] tensorboard: must be true or false (got {tensorboard!r})")
    if tensorboard and importlib.util.find_spec("tensorboard") is None:  # known now, not after the corpus is built
        raise ConfigError(TENSORBOARD_MISSING)
    qat = tspec.pop("qat", None)  # "fp4" (routed experts) or "fp4+fp8" (and the official FP8 linears)
    if qat not in (None, "fp4", "fp4+fp8"):
        raise ConfigError(f"config [train] qat: expected 'fp4' or 'fp4+fp8' (got {qat!r})")
    tcfg = TrainConfig(**tspec)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's processes, each taking an equal share of a batch
    if tcfg.batch_size % world:
        raise ConfigError(f"config [train] batch_size: must be a multiple of the {world} processes torchrun "
                          f"launched (got {tcfg.batch_size})")
    device = train_device(tcfg.device)
    init_from = mspec.pop("init", None)
    if init_from:  # post-training: weights, config and tokenizer of an existing model
        if mspec:
            raise ConfigError(f"config [model] {sorted(mspec)[0]}: with init, the model is init's ({init_from}); "
                              f"no other [model] field (got {', '.join(sorted(mspec))})")
        _check_trained_tokenizer(data, "tokenizer" not in data and f"[model] init gives one ({init_from})")
        _model_dir(init_from, "[model] init")
    _run_dir(run)
    tok, trained = _tokenizer(data, run, resume, init_from)
    ids = {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS)}
    if qat and tuple(ids.values()) != (Config.bos_token_id, Config.eos_token_id):
        raise ConfigError(f"config [train] qat: exports DeepSeek's official layout, which fixes BOS "
                          f"{Config.bos_token_id} and EOS {Config.eos_token_id}; this tokenizer has "
                          f"{ids['bos_token_id']} and {ids['eos_token_id']}")
    mask = None
    if data.get("kind", "text") == "chat":
        tokens, mask = _chat_data(data, tok, tcfg, out)
    else:
        tokens = text_corpus(data, tok, tcfg.seed)
    cut = train_end(len(tokens), tcfg.seq_len + 1, data.get("val_fraction", DATA_DEFAULTS["val_fraction"]))
    if cut < tcfg.seq_len + 1:  # the trainer would wrap the corpus around inside every row
        raise ConfigError(f"config [data]: {cut:,} training tokens, fewer than one row of [train] seq_len + 1 = "
                          f"{tcfg.seq_len + 1:,}; add files or lower seq_len")
    train_tokens, val_tokens = tokens[:cut], tokens[cut:]
    train_mask = None if mask is None else mask[:cut]
    val_mask = None if mask is None else mask[cut:]
    if mask is not None and data.get("replay"):  # keep pretraining ability: mix in rows of its corpus
        train_tokens, train_mask = _with_replay(train_tokens, train_mask, data, replay_source, tok, tcfg, out)

    from .distributed import DataParallel, init

    # under torchrun: data parallel over the launched processes (NCCL for GPUs, gloo for the CPU)
    rank, world = init("nccl" if device.type == "cuda" else "gloo")
    lead = rank == 0
    ckpt = run / "checkpoint"
    if not resume and (ckpt.exists() or ckpt.with_name("checkpoint.old").exists()):
        # a fresh run would overwrite it at its first save (and its tokenizer no longer fits it): never silently
        raise ConfigError(f"config [train] out: {run} already holds a training checkpoint; pass --resume to "
                          f"continue that run, or choose another out (or delete {ckpt})")
    if lead and trained:  # saved only now, with the corpus checked: a failed run leaves no tokenizer to reuse
        # each file whole or absent; tokenizer.json last, as --resume reuses a tokenizer when it is there
        _replace_file(run / "tokenizer-settings.json",
                      json.dumps({"vocab_size": data.get("vocab_size", DATA_DEFAULTS["vocab_size"])}))
        _replace_file(run / "tokenizer.json", tok.to_str(pretty=True))
    torch.manual_seed(tcfg.seed)
    if init_from:
        model = load_model(init_from, dtype=torch.float32)
        _check_special_ids(model.config, tok, init_from, "[data] tokenizer" if data.get("tokenizer") else None)
    else:
        preset = mspec.pop("preset", "tiny")
        cfg = {"tiny": Config.tiny, "flash": Config.flash, "pro": Config.pro}[preset](
            **{**mspec, "vocab_size": tok.get_vocab_size(), **ids})  # the engine stops at config.eos_token_id
        model = init_random(build_model(cfg), seed=tcfg.seed)
        install_tid2eid(model, np.bincount(train_tokens, minlength=cfg.vocab_size))  # balanced hash routing
    if model.config.vocab_size < tok.get_vocab_size():
        raise ConfigError(f"tokenizer has {tok.get_vocab_size()} tokens, model vocab_size {model.config.vocab_size}")
    if qat:
        enable_fp4_qat(model, fp8=qat == "fp4+fp8")
    model.to(device)
    trainer = Trainer(model, train_tokens, tcfg, DataParallel(rank, world) if world > 1 else None, train_mask)
    # what a resume must match besides [train]: the data and QAT (the model config is checked on its own)
    trainer.settings = {**{f"[data] {k}": data.get(k, DATA_DEFAULTS[k]) for k in DATA_FIELDS}, "[train] qat": qat}
    if replay_source:  # the replayed rows come from that config's corpus, split and seed, not from its path
        pdata, ptcfg = replay_source
        trainer.settings.update({f"[data] replay_from: [data] {k}": pdata.get(k, DATA_DEFAULTS[k])
                                 for k in ("files", "exclude", "fim_rate", "val_fraction")})
        trainer.settings.update({f"[data] replay_from: [train] {k}": getattr(ptcfg, k) for k in ("seq_len", "seed")})
    if resume and (ckpt.exists() or ckpt.with_name("checkpoint.old").exists()):
        trainer.resume(ckpt)
        out.write(f"dsv4 train: resumed at step {trainer.step_count}\n")
    elif resume:  # e.g. killed before its first checkpoint: nothing is lost by starting over
        out.write(f"dsv4 train: no checkpoint in {run} yet: starting at step 0\n")
    metrics = run / "metrics.jsonl"
    board = _board(run / "tensorboard") if tensorboard and lead else None
    if lead:  # drop rows from steps after the checkpoint (they will be redone identically)
        _write_rows(metrics, [r for r in _read_rows(metrics) if 0 < r["step"] <= trainer.step_count])
    done_here = 0
    try:
        from tqdm import tqdm
        bar = tqdm(total=tcfg.steps, initial=trainer.step_count, file=out, desc="train") if lead else None
    except ImportError:
        bar = None
    while trainer.step_count < tcfg.steps and (stop_after is None or done_here < stop_after):
        stats = trainer.step()
        done_here += 1
        save = trainer.step_count % every == 0 or trainer.step_count == tcfg.steps
        if save and len(val_tokens) > tcfg.seq_len:  # none with val_fraction = 0 (or too few tokens for a row)
            stats["val_loss"] = validate(model, val_tokens, tcfg, val_mask)
        if lead:  # the row before the checkpoint: a resume keeps the rows up to its step and never redoes them
            with metrics.open("a") as f:
                f.write(_row(stats) + "\n")
            if save:  # every rank holds the same weights
                trainer.save(ckpt)
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
        if qat:  # DeepSeek's layout: FP4 / FP8 weights exactly as trained, the rest rounded to BF16
            save_official(model, run / "official", fp8=qat == "fp4+fp8")
            tok.save(str(run / "official" / "tokenizer.json"))
    return 0


def run_rl(spec: dict, out, resume: bool = False, stop_after: int | None = None) -> int:
    """[rl] method = "grpo" | "distill" (teacher = model dir), eval_examples, eval_every, eval_mix (the held-out
    task kinds, by default the training mix);
    [model] init = model dir; [train] out, checkpoint_every (default 10) plus RLConfig fields.
    Held-out accuracy before, during, after; out/checkpoint/ resumes exactly, as in pretraining."""
    from .rl import GRPO, Distill, RLConfig, check_grpo, evaluate, heldout
    from .sft import ChatRenderer
    from .tasks import check_mix

    mspec, rl, tspec = _tables(spec, {"model": ("init",), "rl": RL_FIELDS,
                                      "train": ("out", "checkpoint_every", *(f.name for f in fields(RLConfig)))})
    rl = {"eval_examples": 100, "eval_every": 0, "eval_mix": None, **rl}  # eval_every 0: at the end only
    init_from = mspec.get("init")
    if not init_from:
        raise ConfigError("config [model] init: post-training needs a model directory to start from")
    _model_dir(init_from, "[model] init")
    run = Path(tspec.pop("out", "runs/dsv4-rl"))
    every = tspec.pop("checkpoint_every", 10)
    if not is_int(every, 1):
        raise ConfigError(f"config [train] checkpoint_every: must be an integer >= 1 (got {every!r})")
    cfg = RLConfig(**tspec)
    method = rl.get("method")
    if method not in ("grpo", "distill"):
        raise ConfigError(f"config [rl] method: expected 'grpo' or 'distill' (got {method!r})")
    if method == "grpo":
        check_grpo(cfg)
        if "teacher" in rl:
            raise ConfigError("config [rl] teacher: read only by method = 'distill' (GRPO learns from rewards); "
                              "remove it")
    for name, least in (("eval_examples", 1), ("eval_every", 0)):
        if not is_int(rl[name], least):
            raise ConfigError(f"config [rl] {name}: must be an integer >= {least} (got {rl[name]!r})")
    if rl["eval_mix"] is not None:
        check_mix(rl["eval_mix"], "[rl] eval_mix")
    renderer = ChatRenderer(init_from)
    if method == "distill":
        if not rl.get("teacher"):
            raise ConfigError("config [rl] teacher: distillation needs a teacher model directory")
        teacher_tok = _load_tokenizer(_model_dir(rl["teacher"], "[rl] teacher"), "[rl] teacher")
        if teacher_tok.get_vocab(with_added_tokens=True) != renderer.tokenizer.get_vocab(with_added_tokens=True):
            raise ConfigError(f"config [rl] teacher: {rl['teacher']} has another tokenizer than the student "
                              f"({init_from}); distillation compares their distributions token id by token id, "
                              "so it needs a teacher with the student's tokenizer.json")
    _run_dir(run)
    ckpt = run / "checkpoint"
    if not resume and (ckpt.exists() or ckpt.with_name("checkpoint.old").exists()):
        raise ConfigError(f"config [train] out: {run} already holds a training checkpoint; pass --resume to "
                          f"continue that run, or choose another out (or delete {ckpt})")
    torch.manual_seed(cfg.seed)
    model = load_model(init_from, dtype=torch.float32)
    _check_special_ids(model.config, renderer.tokenizer, init_from)  # rollouts stop at config.eos_token_id
    if method == "grpo":
        algo = GRPO(model, renderer, cfg)
    else:
        teacher = load_model(rl["teacher"], dtype=torch.float32)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ConfigError(f"config [rl] teacher: {rl['teacher']} has vocab_size {teacher.config.vocab_size}, "
                              f"the student {model.config.vocab_size}; distillation needs the same vocabulary")
        algo = Distill(model, teacher, renderer, cfg)
    tests = heldout(rl["eval_examples"], rl["eval_mix"] or cfg.mix)
    eval_every = rl["eval_every"] or cfg.steps
    metrics = run / "metrics.jsonl"
    # what a resume must match besides [train] (eval_every may change: it only sets when to evaluate)
    algo.settings = {"[rl] method": method, "[rl] teacher": rl.get("teacher"),
                     "[rl] eval_examples": rl["eval_examples"], "[rl] eval_mix": rl["eval_mix"]}
    if resume and (ckpt.exists() or ckpt.with_name("checkpoint.old").exists()):
        algo.resume(ckpt)
        rows = [r for r in _read_rows(metrics) if r["step"] <= algo.step_count]  # later ones are redone
        out.write(f"dsv4 train ({method}): resumed at step {algo.step_count}\n")
    else:
        if resume:
            out.write(f"dsv4 train: no checkpoint in {run} yet: starting at step 0\n")
        rows = [{"step": 0, "heldout": evaluate(model, renderer, tests, cfg.max_tokens)}]
        _write_rows(metrics, rows)
        out.write(f"dsv4 train ({method}): held-out accuracy before {rows[0]['heldout']}\n")
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=algo.step_count, file=out, desc=method)
    done_here = 0
    while algo.step_count < cfg.steps and (stop_after is None or done_here < stop_after):
        stats = algo.step()
        done_here += 1
        if algo.step_count % eval_every == 0 or algo.step_count == cfg.steps:
            stats["heldout"] = evaluate(model, renderer, tests, cfg.max_tokens)
            out.write(f"step {algo.step_count}: held-out {stats['heldout']}\n")
        rows.append(stats)
        _write_rows(metrics, rows)  # before the checkpoint: a resume keeps the rows up to its step
        if algo.step_count % every == 0 or algo.step_count == cfg.steps:
            algo.save(ckpt)
        bar.update(1)
    bar.close()
    if algo.step_count < cfg.steps:  # --stop-after: resumable from the checkpoint
        return 0
    save_model(model.eval(), run / "model")
    renderer.tokenizer.save(str(run / "model" / "tokenizer.json"))
    # (a resume at the last step, from a metrics.jsonl that lost its rows, has no row with the final score)
    after = rows[-1]["heldout"] if rows and "heldout" in rows[-1] else evaluate(model, renderer, tests, cfg.max_tokens)
    if rows and rows[0]["step"] == 0:
        before = rows[0]["heldout"]
        out.write(f"dsv4 train ({method}): held-out accuracy {before['all']:.3f} -> {after['all']:.3f}, "
                  f"reward {before['reward']:.3f} -> {after['reward']:.3f}\n")
    else:  # resumed after metrics.jsonl lost its first rows
        out.write(f"dsv4 train ({method}): held-out accuracy {after['all']:.3f}, reward {after['reward']:.3f}\n")
    return 0


def _check_special_ids(config: Config, tok, init_from, other: str | None = None) -> None:
    """The model at init_from must stop where its tokenizer ends a reply: the engine stops at config.eos_token_id.
    other: the config field naming the tokenizer when it is not init's own."""
    ids = (tok.token_to_id(BOS), tok.token_to_id(EOS))
    have = (config.bos_token_id, config.eos_token_id)
    if ids != have:
        raise ConfigError(f"config [model] init: {init_from} has bos_token_id/eos_token_id {have}, but "
                          f"{other or 'its tokenizer.json'} has BOS/EOS ids {ids}; they must agree (the engine stops "
                          f"at config.eos_token_id): " + ("train with init's own tokenizer (leave it out)" if other else
                                                          "correct the ids in its config.json"))


def _tokenizer(data: dict, run: Path, resume: bool, init_from) -> tuple:
    """-> (tokenizer, trained here). The configured one, else the init model's, else with --resume the run's own
    (trained with the config's vocab_size), else a new BPE on the [data] files: a fresh run never reuses an
    earlier run's tokenizer."""
    if data.get("tokenizer"):
        return _load_tokenizer(data["tokenizer"], "[data] tokenizer"), False
    if init_from:
        return _load_tokenizer(init_from, "[model] init"), False
    vocab_size = data.get("vocab_size", DATA_DEFAULTS["vocab_size"])
    if resume and (run / "tokenizer.json").exists():
        settings = run / "tokenizer-settings.json"  # a BPE can end below vocab_size, so its size does not tell
        try:
            was = json.loads(settings.read_text())["vocab_size"] if settings.exists() else vocab_size
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{settings}: not this run's tokenizer settings ({type(e).__name__}: {e}); restore it "
                              f'as {{"vocab_size": N}} with the vocab_size the tokenizer was trained with') from None
        if was != vocab_size:
            raise ConfigError(f"config [data] vocab_size: {vocab_size}, but this run's tokenizer was trained with "
                              f"{was}; --resume continues a run with its own settings (or start afresh without it)")
        return _load_tokenizer(run / "tokenizer.json", "[train] out"), False
    files = _files(data.get("files"), data.get("exclude", ()))[: data.get("tokenizer_files",
                                                                          DATA_DEFAULTS["tokenizer_files"])]
    for f in files:  # the tokenizer trainer's error for a file that is not UTF-8 names no file
        read_text(f)
    return train_tokenizer(files, vocab_size), True


def _chat_data(data: dict, tok, tcfg: TrainConfig, out) -> tuple[np.ndarray, np.ndarray]:
    """[data] kind = "chat": generated tasks (dsv4.train.tasks) rendered by deepseek-recipe,
    loss on assistant turns. Fields: examples (task draws), mix (kind -> weight)."""
    import tempfile

    from .sft import ChatRenderer, build_sft_corpus
    from .tasks import generate

    with tempfile.TemporaryDirectory() as d:  # the renderer reads a tokenizer file
        tok.save(str(Path(d) / "tokenizer.json"))
        renderer = ChatRenderer(Path(d) / "tokenizer.json")
    examples = generate(data.get("examples", DATA_DEFAULTS["examples"]), tcfg.seed, "train", data.get("mix"))
    try:
        tokens, mask, dropped = build_sft_corpus(examples, renderer, tcfg.seq_len, tok.token_to_id(EOS), tcfg.seed)
    except ValueError as e:  # no example fits a row
        raise ConfigError(f"config [train] seq_len: {e}; raise seq_len") from None
    out.write(f"dsv4 train: {len(examples)} chat examples, {int(mask.sum())} target tokens in "
              f"{len(tokens) // (tcfg.seq_len + 1)} rows ({dropped} too long, dropped)\n")
    return tokens, mask


def _replay_source(data: dict) -> tuple | None:
    """[data] replay_from's config, checked as a run's own (its tables, [data] and [train] values) before any
    work -> (its [data] table, its TrainConfig), or None without replay_from."""
    if data.get("replay") and not data.get("replay_from"):
        raise ConfigError("config [data] replay needs replay_from = the pretraining config to draw text from")
    if not data.get("replay_from"):
        return None
    where = f"config [data] replay_from: {data['replay_from']}: "
    pre = read_config(data["replay_from"], "config [data] replay_from: ")
    try:
        if "rl" in pre:
            raise ConfigError("config [rl]: an RL config has no text corpus")
        _, pdata, ptrain = _tables(pre, RUN_TABLES)
        _check_data(pdata)
        if pdata.get("kind", DATA_DEFAULTS["kind"]) != "text":
            raise ConfigError(f"config [data] kind: {pdata['kind']!r}; replay draws from a text corpus")
        ptcfg = TrainConfig(**{k: v for k, v in ptrain.items() if k not in ("out", "checkpoint_every", "tensorboard",
                                                                            "qat")})
    except ConfigError as e:
        raise ConfigError(where + str(e).removeprefix("config ")) from None
    return pdata, ptcfg


def _with_replay(tokens: np.ndarray, mask: np.ndarray, data: dict, source: tuple, tok, tcfg: TrainConfig, out):
    """[data] replay = fraction, replay_from = a pretraining config (`source`: its checked [data] table and
    TrainConfig): add fraction x (chat rows) rows of that config's corpus (same files, FIM and split; training
    part only), loss on every token; rows shuffled."""
    pdata, ptcfg = source
    text = text_corpus(pdata, tok, ptcfg.seed)
    text = text[: train_end(len(text), ptcfg.seq_len + 1, pdata.get("val_fraction", DATA_DEFAULTS["val_fraction"]))]
    width = tcfg.seq_len + 1
    rows = len(tokens) // width
    n = int(rows * float(data["replay"]))
    if n == 0:
        out.write(f"dsv4 train: replay {data['replay']} of {rows} chat rows is no row: nothing mixed in\n")
        return tokens, mask
    if len(text) <= width:
        raise ConfigError(f"config [data] replay_from: {data['replay_from']}'s training corpus has {len(text)} "
                          f"tokens, fewer than one row of [train] seq_len + 1 = {width}")
    rng = np.random.default_rng(tcfg.seed)
    starts = rng.integers(0, len(text) - width, n)
    extra = np.stack([text[s:s + width] for s in starts]).astype(np.int32)
    all_rows = np.concatenate([tokens.reshape(rows, width), extra])
    all_mask = np.concatenate([mask.reshape(rows, width), np.ones_like(extra, dtype=np.uint8)])
    order = rng.permutation(len(all_rows))
    out.write(f"dsv4 train: {n} rows of {data['replay_from']}'s corpus mixed in\n")
    return all_rows[order].reshape(-1), all_mask[order].reshape(-1)


TENSORBOARD_MISSING = "config [train] tensorboard = true needs the tensorboard package (pip install tensorboard)"


def _board(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(TENSORBOARD_MISSING) from None
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


def _finite(v):
    """v with each NaN or infinity as None: JSON has neither (json.dumps would write an invalid bare NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _row(stats: dict) -> str:
    """One metrics.jsonl line; a NaN (a diverged loss) is written as null."""
    return json.dumps(_finite(stats), allow_nan=False)


def _read_rows(metrics: Path) -> list:
    """metrics.jsonl's rows. A missing file has none; a partial last line (killed mid-append) is dropped."""
    try:
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ConfigError(f"{metrics}: row {i + 1} is not JSON; delete it (or the file) and resume") from None
    return rows


def _write_rows(metrics: Path, rows: list) -> None:
    """Replace metrics.jsonl atomically: a kill leaves the old rows or the new."""
    _replace_file(metrics, "".join(_row(r) + "\n" for r in rows))


def _replace_file(path: Path, text: str) -> None:
    """Write path atomically (a temporary file renamed over it): a kill leaves the old file (or none) or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_rows(metrics)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], np.array([r["loss"] for r in rows], dtype=float), label="train")  # null: NaN
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)

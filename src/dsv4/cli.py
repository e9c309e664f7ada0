"""`dsv4` command line. Subcommands: serve, chat, generate, convert, bench, train, inspect."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import CSA, HCA, SLIDING, Config, ConfigError, is_number
from .footprint import CONVENTIONS, kv_bytes_at, kv_bytes_per_token, param_counts, v32_bytes_per_token

PRESETS = {"flash": Config.flash, "pro": Config.pro, "tiny": Config.tiny}


def _load_config(target: str) -> Config:
    if target in PRESETS:
        return PRESETS[target]()
    p = Path(target)
    if p.is_dir():
        for name in ("config.json", "inference/config.json"):
            if (p / name).exists():
                return Config.from_file(p / name)
        raise ConfigError(f"{p}: no config.json")
    if p.is_file():
        return Config.from_file(p)
    raise ConfigError(f"{target}: not a preset ({', '.join(PRESETS)}), a checkpoint directory or a config file")


def _fmt_params(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def inspect(target: str, context: int, out=None) -> None:
    cfg = _load_config(target)
    w = (out or sys.stdout).write
    counts = {t: cfg.layer_types.count(t) for t in (SLIDING, CSA, HCA)}
    w(f"DeepSeek-V4 config: {target}\n")
    w(f"  layers {cfg.num_hidden_layers} (sliding {counts[SLIDING]}, CSA m={cfg.csa_compress_ratio} {counts[CSA]}, "
      f"HCA m'={cfg.hca_compress_ratio} {counts[HCA]}) + MTP {cfg.num_nextn_predict_layers}\n")
    w(f"  hidden {cfg.hidden_size}, heads {cfg.num_attention_heads} x {cfg.head_dim} (rope {cfg.qk_rope_head_dim}), "
      f"q_lora {cfg.q_lora_rank}, o_groups {cfg.o_groups} x {cfg.o_lora_rank}, window {cfg.sliding_window}\n")
    w(f"  indexer {cfg.index_n_heads} x {cfg.index_head_dim}, top-{cfg.index_topk}; experts {cfg.n_routed_experts} "
      f"(top-{cfg.num_experts_per_tok}, {cfg.num_hash_layers} hash layers) + {cfg.n_shared_experts} shared, "
      f"inter {cfg.moe_intermediate_size}; mHC n={cfg.hc_mult}; vocab {cfg.vocab_size}\n")
    p = param_counts(cfg)
    w(f"Parameters: total {_fmt_params(p['total'])} ({_fmt_params(p['total_with_mtp'])} with MTP), "
      f"active {_fmt_params(p['active'])} ({_fmt_params(p['active_with_mtp'])} with MTP)\n")
    w(f"KV cache at context {context:,} tokens (per token amortised; total for one sequence incl. windows):\n")
    w(f"  {'conv':<5}{'V4 B/tok':>12}{'V3.2 B/tok':>12}{'ratio':>8}{'V4 total':>14}{'V3.2 total':>14}  layout\n")
    for name, conv in CONVENTIONS.items():
        ours, v32 = kv_bytes_per_token(cfg, name), v32_bytes_per_token(name)
        total = kv_bytes_at(cfg, context, name)
        w(f"  {name:<5}{ours:>12,.1f}{v32:>12,.0f}{ours / v32:>8.1%}{total / 1e9:>11.3f} GB{v32 * context / 1e9:>11.3f} GB"
          f"  {conv.description}\n")


BUNDLED = Path(__file__).resolve().parents[2] / "models" / "dsv4-tiny"  # in the repository (editable install)


def _model_path(path, doing: str) -> Path:
    """--model, or by default the bundled dsv4-tiny (a random stand-in where the package has no bundled model)."""
    if path is not None:
        return Path(path)
    if (BUNDLED / "config.json").exists():
        print(f"dsv4: {doing} the bundled dsv4-tiny ({BUNDLED}); pass --model PATH for another checkpoint",
              file=sys.stderr)
        return BUNDLED
    from .server.devmodel import build_dev_model
    print(f"dsv4: the bundled model is not at {BUNDLED} (install from the repository with pip install -e .); "
          f"{doing} a small randomly initialised V4 built locally instead (its answers are noise)", file=sys.stderr)
    return Path(build_dev_model())


def engine_config(args):
    """`dsv4 serve`'s options -> the engine's configuration."""
    from .engine import EngineConfig

    for name in ("kv_budget_gib", "cache_gib", "cache_disk_gib", "max_concurrency"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if args.speculative_tokens < 0:
        raise ConfigError("--speculative-tokens must be >= 0")
    return EngineConfig(max_num_seqs=args.max_concurrency, compile=args.compile,
                        kv_budget_bytes=int(args.kv_budget_gib * 2**30), cache_layout=args.cache_layout,
                        prefix_cache_bytes=int(args.cache_gib * 2**30), prefix_cache_dir=args.cache_dir,
                        prefix_cache_disk_bytes=int(args.cache_disk_gib * 2**30),
                        isolate_users=args.isolate_users, num_speculative_tokens=args.speculative_tokens)


def serve(args) -> int:
    import torch
    import uvicorn

    from .checkpoint import load_model
    from .engine import AsyncLLM, LLMEngine
    from .server import ServerConfig, create_app

    path = _model_path(args.model, "serving")
    keys = []
    if args.api_key_file:
        try:
            keys = [k.strip() for k in Path(args.api_key_file).read_text().splitlines() if k.strip()]
        except OSError as e:
            raise ConfigError(f"--api-key-file: {e}") from None
        if not keys:
            raise ConfigError(f"{args.api_key_file}: no API keys in the file")
    if args.balance_usd is not None and not is_number(args.balance_usd):
        raise ConfigError(f"--balance-usd: must be a number of USD >= 0 (got {args.balance_usd})")
    config = ServerConfig(args.served_model_name, keys, max_concurrency=args.max_concurrency,
                          balance_usd=args.balance_usd)
    if args.prices:
        config.prices.update(_price_table(args.prices))
    tokenizer = _tokenizer(path)  # before the (slow) weights: a missing one is the likelier mistake
    model = load_model(path, dtype=getattr(torch, args.dtype))
    try:
        engine = LLMEngine(model, tokenizer, engine_config(args))
    except ValueError as e:  # an option this model cannot take (speculation without MTP, fp8 layout dims)
        raise ConfigError(str(e)) from None
    if args.compile:
        print("dsv4: compiling the decode step (minutes the first time; cached on disk)", file=sys.stderr)
        engine.warmup()
    app = create_app(AsyncLLM(engine), str(path / "tokenizer.json"), config)
    print(f"dsv4: serving {path} as {args.served_model_name} on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def generate(args) -> int:
    """Complete raw text prompts offline (no server, no chat template) and print each completion."""
    import json

    import torch

    from .checkpoint import load_model
    from .engine import LLM, RequestError, SamplingParams

    prompts = args.prompt or [sys.stdin.read()]
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=args.stop or [], ignore_eos=args.ignore_eos)
    except RequestError as e:
        raise ConfigError(re.sub(r"sampling parameter '(\w+)'", lambda m: "--" + m[1].replace("_", "-"),
                                 str(e))) from None
    path = _model_path(args.model, "generating with")
    tokenizer = _tokenizer(path)
    llm = LLM(load_model(path, dtype=getattr(torch, args.dtype)), tokenizer, compile=args.compile)
    try:
        outs = llm.generate(prompts, params)
    except RequestError as e:  # e.g. a prompt longer than the model's context
        raise ConfigError(str(e)) from None
    for prompt, o in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason}, ensure_ascii=False), flush=True)
        else:
            print(o.text, flush=True)
    return 0


def convert(args) -> int:
    """Rewrite a checkpoint (HF format or DeepSeek's official FP8/FP4 layout) in the other format, or the
    same format in another dtype; tokenizer.json comes along. Streamed (checkpoint.convert_checkpoint): tensors
    are read, converted and written shard by shard, routed experts one at a time, so peak memory is about one
    output shard plus a few experts, not the model. The source is checked as load_model checks it; on an error nothing is
    left at the destination."""
    import shutil

    import torch

    from .checkpoint import convert_checkpoint

    src, dst = Path(args.source), Path(args.dest)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a checkpoint directory")
    if dst.resolve() == src.resolve():
        raise ConfigError(f"{dst}: the destination is the source; write the converted checkpoint elsewhere")
    if dst.exists() and any(dst.iterdir()):
        raise ConfigError(f"{dst}: exists and is not empty; choose a new directory")
    convert_checkpoint(src, dst, args.to, getattr(torch, args.dtype), fp8=not args.no_fp8,
                       fp4_experts=not args.no_fp4)
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    print(f"dsv4: wrote {dst} ({args.to} format)", file=sys.stderr)
    return 0


def bench(args) -> int:
    """Measure a checkpoint's prefill and decode speed and decode-state memory in the engine (dsv4/bench.py)."""
    import torch

    from . import bench as measure
    from .checkpoint import load_model
    from .engine import RequestError

    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ConfigError(f"--batch must be batch sizes >= 1, separated by commas (got {args.batch!r})")
    for name in ("context", "tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1")
    model = load_model(_model_path(args.model, "measuring"), dtype=getattr(torch, args.dtype))
    try:
        measure.run(model, args.context, batches, args.tokens, args.compile, args.cache_layout)
    except (RequestError, ValueError) as e:  # a context past the model's length; a layout the model cannot take
        raise ConfigError(str(e)) from None
    return 0


def _price_table(file: str) -> dict:
    """--prices: a JSON object of model name -> [cache hit, cache miss, output] USD per 1M tokens."""
    import json

    try:
        table = json.loads(Path(file).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: not a price table ({e})") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{file}: a price table is a JSON object of model name -> [cache hit, cache miss, output]")
    for model, v in table.items():
        if not (isinstance(v, list) and len(v) == 3 and all(is_number(x) for x in v)):
            raise ConfigError(f"{file}: {model!r} must map to three prices >= 0 in USD per 1M tokens "
                              f"[cache hit, cache miss, output], not {v!r}")
    return {m: tuple(float(x) for x in v) for m, v in table.items()}


def _tokenizer(path: Path):
    """The checkpoint's tokenizer.json, which serving needs beside the weights."""
    from .tokenizer import load_tokenizer

    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    try:
        return load_tokenizer(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no tokenizer.json (dsv4.save_model writes the weights and config only: "
                              "copy in the tokenizer.json the model was trained with)") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def chat(args) -> int:
    from .chat import chat_loop

    url = args.url
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must be an http:// or https:// address (got {url!r})")
    if args.model:
        import socket
        import threading
        import time

        import uvicorn

        from .checkpoint import load_model
        from .engine import AsyncLLM, LLMEngine
        from .server import ServerConfig, create_app
        path = Path(args.model)
        tokenizer = _tokenizer(path)
        llm = AsyncLLM(LLMEngine(load_model(path), tokenizer))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = create_app(llm, str(path / "tokenizer.json"), ServerConfig(args.served_model_name))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise ConfigError("the local server for --model did not start (see the message above)")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
    return chat_loop(url, args.api_key, args.served_model_name, not args.no_thinking, args.max_tokens)


def _port(text: str) -> int:
    if not (text.isdigit() and 0 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535 (got {text!r})")
    return int(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in PyTorch")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("inspect", help="config, parameter counts and KV-cache bytes of a checkpoint or preset")
    ins.add_argument("target", help="checkpoint directory, config.json, or preset: flash, pro, tiny")
    ins.add_argument("--context", type=int, default=1 << 20, help="context length in tokens (default 1048576)")
    srv = sub.add_parser("serve", help="DeepSeek-compatible API server")
    srv.add_argument("--model", help="checkpoint directory with tokenizer.json (default: the bundled model)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=_port, default=8000)
    srv.add_argument("--api-key-file", help="file with one accepted API key per line (default: no auth)")
    srv.add_argument("--served-model-name", default="deepseek-v4-flash")
    srv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    srv.add_argument("--max-concurrency", type=int, default=64)
    srv.add_argument("--prices", help='JSON file: {"model": [hit, miss, output] USD per 1M tokens} (default: '
                                      "DeepSeek's published V4 prices)")
    srv.add_argument("--balance-usd", type=float,
                     help="each API key's balance in USD, spent at --prices: GET /user/balance reports what is "
                          "left, and requests get 402 Insufficient Balance once it is spent (default: no balance)")
    srv.add_argument("--compile", action="store_true",
                     help="compile the batched decode step ahead of time (AOTInductor; minutes the first time, "
                          "then cached on disk): several times faster decoding")
    srv.add_argument("--kv-budget-gib", type=float, default=8.0, help="decode-state memory budget (GiB)")
    srv.add_argument("--cache-layout", default="dense", choices=["dense", "fp8"],
                     help="compressed entries as stored: the model's dtype, or V4's production layout (FP8 nope "
                          "+ BF16 RoPE dims, FP4 indexer keys)")
    srv.add_argument("--cache-gib", type=float, default=1.0, help="context (prefix) cache memory cap (GiB)")
    srv.add_argument("--cache-dir", help="also keep the context cache on disk here (checksummed): hits survive "
                                         "restarts, as DeepSeek's context caching on disk")
    srv.add_argument("--cache-disk-gib", type=float, default=16.0,
                     help="cap of the context cache on disk (GiB; least recently used blocks go first)")
    srv.add_argument("--isolate-users", action="store_true",
                     help="context-cache hits only within one end user (the request's user_id)")
    srv.add_argument("--speculative-tokens", type=int, default=0,
                     help="MTP draft tokens verified per decode step (needs the model's MTP module; 0: off)")
    ch = sub.add_parser("chat", help="terminal chat against a running server (or --model PATH, started locally)")
    ch.add_argument("--url", default="http://127.0.0.1:8000")
    ch.add_argument("--model", help="checkpoint directory: start a local server on it first")
    ch.add_argument("--api-key", default=None)
    ch.add_argument("--served-model-name", default="deepseek-v4-flash")
    ch.add_argument("--no-thinking", action="store_true")
    ch.add_argument("--max-tokens", type=int, default=512)
    gen = sub.add_parser("generate", help="complete text prompts offline (no server) and print the completions")
    gen.add_argument("prompt", nargs="*", help="raw text prompts, each completed as is (default: read one from "
                                               "stdin)")
    gen.add_argument("--model", help="checkpoint directory with tokenizer.json (default: the bundled model)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 (the default): off")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (may be repeated)")
    gen.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--compile", action="store_true", help="compile the decode step (as dsv4 serve --compile)")
    gen.add_argument("--json", action="store_true",
                     help="one JSON line per prompt: prompt, text, token_ids, finish_reason")
    cv = sub.add_parser("convert", help="rewrite a checkpoint in HF format or DeepSeek's official FP8/FP4 layout, "
                                        "streamed tensor by tensor (memory: about one shard plus one layer)")
    cv.add_argument("source", help="checkpoint directory (either format)")
    cv.add_argument("dest", help="new directory to write")
    cv.add_argument("--to", required=True, choices=["hf", "official"],
                    help="hf: transformers' layout and names; official: DeepSeek's inference layout")
    cv.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="the dtype of unquantised weights (default bfloat16)")
    cv.add_argument("--no-fp8", action="store_true", help="official: keep linear weights in BF16, not FP8")
    cv.add_argument("--no-fp4", action="store_true", help="official: keep routed experts in BF16, not FP4")
    bn = sub.add_parser("bench", help="prefill and decode speed and decode-state memory of a checkpoint here")
    bn.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    bn.add_argument("--context", type=int, default=1024, help="prompt length in tokens (default 1024)")
    bn.add_argument("--batch", default="1,8,32", help="decode batch sizes, comma-separated (default 1,8,32)")
    bn.add_argument("--tokens", type=int, default=32, help="timed decode steps per batch size (default 32)")
    bn.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    bn.add_argument("--cache-layout", default="dense", choices=["dense", "fp8"])
    bn.add_argument("--compile", action="store_true", help="the compiled decode step (as dsv4 serve --compile)")
    tr = sub.add_parser("train", help="train from a TOML or YAML config (see README)")
    tr.add_argument("config", help="TOML file (or YAML: .yaml / .yml) with model, data and train tables "
                                   "(and rl for post-training)")
    tr.add_argument("--resume", action="store_true", help="continue exactly from the run's last checkpoint")
    tr.add_argument("--stop-after", type=int, default=None,
                    help="end this process after this many steps, without saving: a later --resume continues "
                         "from the last checkpoint and redoes the steps after it")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "train":
            from .train.run import run_from_config

            return run_from_config(args.config, resume=args.resume, stop_after=args.stop_after)
        if args.cmd == "serve":
            return serve(args)
        if args.cmd == "chat":
            return chat(args)
        if args.cmd == "generate":
            return generate(args)
        if args.cmd == "convert":
            return convert(args)
        if args.cmd == "bench":
            return bench(args)
        if args.cmd == "inspect":
            if args.context <= 0:
                raise ConfigError("--context must be a positive number of tokens")
            inspect(args.target, args.context)
    except (ConfigError, CheckpointError) as e:  # CheckpointError names the file and tensor
        print(f"dsv4: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `dsv4 inspect flash | head`: the reader left; no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

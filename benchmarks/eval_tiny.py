"""Evaluate a dsv4 chat model (default: the bundled models/dsv4-tiny) on held-out data.

    python benchmarks/eval_tiny.py [MODEL_DIR] [--pretrain-config configs/tiny/pretrain.toml] [--n 100]

Prints (and with --json writes):
- validation loss on the held-out end of the pretraining corpus (same files, FIM and split as training);
- FIM exact match: one line of a held-out function (from files wholly inside that held-out end) hidden
  and filled in greedily through the server's FIM prompt form;
- per generated-task kind (held-out cities, names and number pairs): greedy accuracy; for tool calls the
  fraction that parse into a valid call of an offered tool with its required arguments, and the fraction
  exactly right; for JSON answers validity and correctness without and with constrained decoding; echo
  accuracy (repeating a phrase of held-out names exactly: can the model copy from its context?);
- MTP speculative decoding: acceptance rate and batch-1 decode speed with and without it (greedy outputs
  must be equal).
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import time
import tomllib
from pathlib import Path

import torch

import dsv4
from dsv4.engine.constrain import JSONObjectConstraint
from dsv4.engine.engine import EngineConfig, LLMEngine
from dsv4.engine.sampling import SamplingParams
from dsv4.tokenizer import FIM_TOKENS, load_tokenizer
from dsv4.train.rl import heldout, rollout
from dsv4.train.run import _files, text_corpus, train_end, validate
from dsv4.train.sft import BOS, ChatRenderer
from dsv4.train.tasks import TOOLS, score
from dsv4.train.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def val_split(model_dir: Path, config: Path):
    """(val tokens, files wholly in the validation end) exactly as `dsv4 train` split the corpus."""
    spec = tomllib.loads(config.read_text())
    data, train = spec["data"], spec["train"]
    tok = load_tokenizer(model_dir)
    files = _files(data.get("files"), data.get("exclude", ()))
    starts: list = []
    tokens = text_corpus(data, tok, train.get("seed", 0), starts)
    cut = train_end(len(tokens), train["seq_len"] + 1, data.get("val_fraction", 0.02))
    held = [files[i] for i, off in starts if off >= cut]
    return tokens[cut:], train["seq_len"], held


def fim_cases(files: list, n: int, seed: int = 0) -> list:
    """(prefix, suffix, line): one body line of a function hidden, up to n cases."""
    rng = random.Random(seed)
    cases = []
    for f in files:
        text = Path(f).read_text()
        lines = text.splitlines(keepends=True)
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef) or node.end_lineno - node.lineno < 3:
                continue
            body = [i for i in range(node.body[0].lineno - 1, node.end_lineno) if lines[i].strip()
                    and not lines[i].strip().startswith(("#", '"', "'"))]
            if not body:
                continue
            i = rng.choice(body)
            cases.append(("".join(lines[:i])[-1500:], "".join(lines[i + 1:])[:600], lines[i].rstrip("\n")))
    rng.shuffle(cases)
    return cases[:n]


def fim_exact_match(model, tok, cases: list) -> float:
    engine = LLMEngine(model, tok, EngineConfig(prefix_block=0))
    seqs = []
    for prefix, suffix, line in cases:
        ids = tok.encode(f"{BOS}{FIM_TOKENS[0]}{prefix}{FIM_TOKENS[1]}{suffix}{FIM_TOKENS[2]}").ids
        seqs.append((engine.add_request(ids, SamplingParams(max_tokens=48, temperature=0.0, stop=["\n"])), line))
    while engine.has_unfinished():
        engine.step()
    hits = [s.output().text.split("\n")[0].rstrip() == line.rstrip() for s, line in seqs]
    return sum(hits) / max(1, len(hits))


def tool_validity(ex, msg) -> bool:
    """Exactly one call of an offered tool whose arguments are a JSON object with the required keys."""
    calls = msg["tool_calls"]
    if len(calls) != 1 or not isinstance(calls[0]["arguments"], dict):
        return False
    offered = {t["function"]["name"] for t in ex.body["tools"]}
    name = calls[0]["name"]
    return name in offered and set(TOOLS[name]["function"]["parameters"]["required"]) <= set(calls[0]["arguments"])


def tasks_eval(model, renderer, n: int) -> dict:
    out = {}
    exs = heldout(7 * n, {"add": 1, "tool": 1, "json": 1, "chat": 1, "code": 1, "echo": 1})
    results = rollout(model, renderer, exs, SamplingParams(max_tokens=96, temperature=0.0))
    for kind in ["add", "tool", "tool_result", "json", "chat", "code", "echo"]:
        rs = [(ex, m) for ex, _, _, m in results if ex.kind == kind][:n]
        if not rs:
            continue
        out[f"{kind} accuracy"] = sum(score(ex, m["content"], m["tool_calls"]) for ex, m in rs) / len(rs)
        if kind == "tool":
            out["tool-call validity"] = sum(tool_validity(ex, m) for ex, m in rs) / len(rs)
        if kind == "json":
            out["json validity (free)"] = sum(_is_object(m["content"]) for _, m in rs) / len(rs)
            jexs = [ex for ex, _ in rs]
            tok = renderer.tokenizer
            cons = rollout(model, renderer, jexs, SamplingParams(max_tokens=96, temperature=0.0),
                           constraint=lambda: JSONObjectConstraint(tok, model.config.eos_token_id))
            out["json validity (constrained)"] = sum(_is_object(m["content"]) for *_, m in cons) / len(cons)
            out["json accuracy (constrained)"] = sum(score(ex, m["content"], []) for ex, _, _, m in cons) / len(cons)
        out[f"{kind} n"] = len(rs)
    return out


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (TypeError, ValueError):
        return False


def mtp_eval(model, renderer, n: int = 12, max_tokens: int = 64) -> dict:
    """Batch-1 greedy decode of held-out chat prompts, without and with MTP drafts (k = 1)."""
    prompts = [renderer.prompt_ids(ex.body) for ex in heldout(n, {"code": 1, "chat": 1, "add": 1, "json": 1})]
    res = {}
    outs = {}
    for k in (0, 1):
        engine = LLMEngine(model, renderer.tokenizer, EngineConfig(prefix_block=0, num_speculative_tokens=k))
        gen, secs, toks = [], 0.0, 0
        for p in prompts:
            engine.add_request(p, SamplingParams(max_tokens=1, temperature=0.0))  # warm, prefill the prompt
            while engine.has_unfinished():
                engine.step()
            seq = engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0.0))
            t = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            secs += time.perf_counter() - t
            toks += len(seq.output_ids)
            gen.append(list(seq.output_ids))
        outs[k] = gen
        res[f"decode tok/s (k={k})"] = toks / secs
        if k:
            res["MTP acceptance"] = engine.stats["accepted"] / max(1, engine.stats["proposed"])
    res["MTP speedup"] = res["decode tok/s (k=1)"] / res["decode tok/s (k=0)"]
    res["greedy equal with MTP"] = outs[0] == outs[1]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "models" / "dsv4-tiny"))
    ap.add_argument("--pretrain-config", default=str(ROOT / "configs" / "tiny" / "pretrain.toml"))
    ap.add_argument("--n", type=int, default=100, help="held-out examples per task kind and FIM cases")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model_dir = Path(args.model)
    model = dsv4.load_model(model_dir, dtype=torch.float32)
    renderer = ChatRenderer(model_dir)
    res = {}
    val, seq_len, held_files = val_split(model_dir, Path(args.pretrain_config))
    res["validation loss"] = validate(model, val, TrainConfig(seq_len=seq_len), batches=10_000)
    res["validation tokens"] = len(val)
    res["FIM exact match"] = fim_exact_match(model, renderer.tokenizer, fim_cases(held_files, args.n))
    res["FIM files"] = [Path(f).name for f in held_files]
    res.update(tasks_eval(model, renderer, args.n))
    res.update(mtp_eval(model, renderer))
    print("| metric | value |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training benchmark on a real corpus (the Python standard library's source): Muon vs AdamW, and dsv4's
training step against transformers' DeepseekV4ForCausalLM on the same config, one process run.

For each optimiser a small learning-rate sweep runs the same steps on the same tokens; the best of each
is compared by validation loss. Then Muon (its best learning rate) trains again with shorter budgets, each
on its own warmup-stable-decay schedule, to find the fewest steps whose final validation loss reaches
AdamW's (as a fraction of AdamW's steps, in tenths; a single run's curve would not tell, since a WSD run
gains most of its loss in the decay). Writes benchmarks/train_curves.png.
Usage: python benchmarks/train_bench.py [--steps 63] [--batch 64] [--speed-only] [--seq 128,512,1024]
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import dsv4  # noqa: E402
from dsv4.checkpoint import build_model, init_random  # noqa: E402
from dsv4.config import CSA, HCA, SLIDING  # noqa: E402
from dsv4.tokenizer import train_tokenizer  # noqa: E402
from dsv4.train import TrainConfig, Trainer, param_groups  # noqa: E402
from dsv4.train.data import build_corpus  # noqa: E402
from dsv4.train.run import validate  # noqa: E402


# Both optimisers split the parameters the same way (muon.param_groups): the matrices, and the rest
# (embedding, output head, vectors). Muon: (Muon lr for the matrices, AdamW lr for the rest). AdamW:
# (AdamW lr for the matrices, AdamW lr for the rest). The rest takes a higher lr than the matrices in both:
# one AdamW lr for every parameter left the embedding and head under-trained (125 x 32: AdamW 2e-3 for
# all 5.472, 2e-3 / 4e-3 split 5.264), and Muon's old (0.01, 2e-3) gave 5.306 against (0.01, 4e-3) 5.206.
MUON_LRS = [(0.005, 2e-3), (0.01, 4e-3), (0.02, 8e-3)]
ADAMW_LRS = [(1.5e-3, 3e-3), (2e-3, 4e-3), (3e-3, 6e-3)]


def config(vocab):
    return dsv4.Config.tiny(vocab_size=vocab, hidden_size=128, moe_intermediate_size=128, num_hidden_layers=4,
                            layer_types=[SLIDING, CSA, HCA, CSA], num_attention_heads=4, head_dim=64,
                            qk_rope_head_dim=16, q_lora_rank=64, o_lora_rank=32, sliding_window=64,
                            hca_compress_ratio=32, num_nextn_predict_layers=0)


def train(cfg, tokens, val, steps, lr_muon, lr_adamw, muon: bool, every: int, batch: int = 8):
    torch.manual_seed(0)
    model = init_random(build_model(cfg), seed=0)
    tc = TrainConfig(steps=steps, batch_size=batch, seq_len=128, warmup=10, lr_muon=lr_muon if muon else 0.0,
                     lr_adamw=lr_adamw)
    t = Trainer(model, tokens, tc)
    if not muon:  # AdamW for every parameter (lr_muon: its lr for the matrices): replace the split optimisers
        matrices, rest = param_groups(model)
        t.opts = [torch.optim.AdamW(matrices, lr=lr_muon, weight_decay=0.1, betas=(0.9, 0.95)),
                  torch.optim.AdamW(rest, lr=lr_adamw, weight_decay=0.1, betas=(0.9, 0.95))]
        t.base_lrs = [lr_muon, lr_adamw]
    curve = []
    for _ in range(steps):
        t.step()
        if t.step_count % every == 0:
            curve.append((t.step_count, validate(model, val, tc, batches=64)))  # 8,256 tokens: 8 rows were noisy
    return curve


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=63)
    ap.add_argument("--batch", type=int, default=64, help="rows of 128 tokens per step")
    ap.add_argument("--speed-only", action="store_true", help="only the training-throughput comparison")
    ap.add_argument("--seq", default="128,512,1024", help="sequence lengths of the throughput comparison")
    args = ap.parse_args()
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    tok = train_tokenizer(files[:150], 2048)
    tokens = build_corpus(files[:150], tok, 1)
    val = build_corpus(files[150:170], tok, 1)
    cfg = config(tok.get_vocab_size())
    seqs = [int(x) for x in args.seq.split(",") if x]  # --seq "": no throughput comparison
    if args.speed_only:
        for seq in seqs:
            speed(cfg, tokens, seq)
        return
    print(f"corpus: {len(tokens):,} train / {len(val):,} val tokens (stdlib), vocab {cfg.vocab_size}; "
          f"{args.steps} steps x {args.batch} x 128 tokens\n")
    every = max(1, args.steps // 10)
    runs, lrs_of = {}, {}
    for muon, lrs in ((True, MUON_LRS), (False, ADAMW_LRS)):
        for lr_m, lr_a in lrs:
            t0 = time.perf_counter()
            curve = train(cfg, tokens, val, args.steps, lr_m, lr_a, muon, every, args.batch)
            name = f"{'muon' if muon else 'adamw'} lr={lr_m}/{lr_a}"
            runs[name], lrs_of[name] = curve, (lr_m, lr_a)
            print(f"{name:<18} final val {curve[-1][1]:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    best = {k: min(((n, c) for n, c in runs.items() if n.startswith(k)), key=lambda nc: nc[1][-1][1])
            for k in ("muon", "adamw")}
    target = best["adamw"][1][-1][1]
    print(f"\nbest: {best['muon'][0]} -> {best['muon'][1][-1][1]:.4f}; {best['adamw'][0]} -> {target:.4f}")
    lr_m, lr_a = lrs_of[best["muon"][0]]
    finals, tenth = {}, 7  # start at the target fraction 0.7; walk down while reached, up while not
    while 1 <= tenth <= 9 and tenth not in finals:
        n = args.steps * tenth // 10
        finals[tenth] = train(cfg, tokens, val, n, lr_m, lr_a, True, n, args.batch)[-1][1]
        print(f"muon, {n} steps: final val {finals[tenth]:.4f} ({'reaches' if finals[tenth] <= target else 'above'} "
              f"AdamW's {target:.4f} at {args.steps})", flush=True)
        tenth += -1 if finals[tenth] <= target else 1
    reached = [t for t, v in finals.items() if v <= target]
    print("Muon steps to reach AdamW's final val loss: " +
          (f"{min(reached) / 10:.1f} of AdamW's steps" if reached else "more than 0.9 of AdamW's steps"))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in runs.items():
        ax.plot(*zip(*curve), label=name, lw=2 if name in (best["muon"][0], best["adamw"][0]) else 0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "train_curves.png")

    for seq in seqs:
        speed(cfg, tokens, seq)


def speed(cfg, tokens, seq: int, batch: int = 8):
    """Training tokens/s of one step (forward, backward, AdamW) of each implementation on the same weights:
    dsv4 eager, dsv4 compiled (what `[train] compile = true` runs), transformers eager."""
    import torch._dynamo

    model = init_random(build_model(cfg), seed=0).train()
    ids = torch.from_numpy(tokens[: batch * (seq + 1)].astype(np.int64)).view(batch, seq + 1)
    with tempfile.TemporaryDirectory() as d:
        dsv4.save_model(model, d)
        from transformers import DeepseekV4ForCausalLM
        ref = DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32).train()

    def timed(step, n=5):
        step()
        t = time.perf_counter()
        for _ in range(n):
            step()
        return batch * seq * n / (time.perf_counter() - t)

    opt_a, opt_b = torch.optim.AdamW(model.parameters(), lr=1e-4), torch.optim.AdamW(ref.parameters(), lr=1e-4)

    def loss_fn(x):
        return F.cross_entropy(model(x[:, :-1]).reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))

    compiled = torch.compile(loss_fn, dynamic=False)  # each length its own static graph (a second length would
    # otherwise recompile one dynamic-shape graph: slower to build and to run)

    def ours(fn=loss_fn):
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            loss = fn(ids)
        opt_a.zero_grad()
        loss.backward()
        opt_a.step()

    def theirs():
        loss = ref(ids[:, :-1], labels=ids[:, :-1].clone(), use_cache=False).loss
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()

    b = timed(theirs)
    a = timed(ours)
    t = time.perf_counter()
    ours(compiled)
    first = time.perf_counter() - t
    c = timed(lambda: ours(compiled))
    print(f"\ntraining tokens/s (fp32, batch {batch} x {seq}): transformers {b:,.0f}; dsv4 eager {a:,.0f} "
          f"({a / b:.2f}x); dsv4 compiled {c:,.0f} ({c / b:.2f}x; first step with compilation {first:.0f} s)",
          flush=True)

if __name__ == "__main__":
    main()

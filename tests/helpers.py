"""Shared test helpers: random non-trivial weights and the transformers oracle."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np
import torch

from dsv4.checkpoint import build_model, init_random
from dsv4.config import Config


def np_sinkhorn(logits, iters: int, eps: float):
    """Sinkhorn-Knopp in NumPy (architecture.md section 2): softmax over rows + eps, column normalisation, then
    iters - 1 rounds of row and column normalisation, each with eps in the denominator."""
    c = np.exp(logits - logits.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + eps
    c = c / (c.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdims=True) + eps)
        c = c / (c.sum(-2, keepdims=True) + eps)
    return c


def random_model(cfg: Config, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """A model whose every parameter is non-trivial: sinks, router biases, ape, mHC bases and scales too."""
    torch.manual_seed(seed)
    model = init_random(build_model(cfg, torch.float32), std=std, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_sink", ".ape", "_base")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(("_scale", "norm.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("_fn"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(torch.randn(b.shape, generator=g))
    return model.eval()


def tid2eid_with(value, dtype=torch.long) -> dict[str, torch.Tensor]:
    """A hash layer's tid2eid for Config.tiny() holding `value` once (an expert id, or not one) among zeros."""
    cfg = Config.tiny()
    t = torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=dtype)
    t[3, 0] = value
    return {"layers.0.ffn.gate.tid2eid": t}


def hf_model(path):
    """transformers' model, its indexer's ties broken as dsv4 breaks them (`ties_to_the_earlier_entry`)."""
    from transformers import DeepseekV4ForCausalLM
    model = DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    forward = model.forward

    def forward_with_dsv4_ties(*args, **kwargs):
        with ties_to_the_earlier_entry():
            return forward(*args, **kwargs)
    model.forward = forward_with_dsv4_ties
    return model


@contextlib.contextmanager
def ties_to_the_earlier_entry():
    """`Tensor.topk` over the last dim with scores of exactly 0 ranked by position, as dsv4's indexer ranks them.

    With random weights many indexer scores are exactly 0 (ReLUs all 0), so the k-th best score often ties.
    The architecture leaves the choice among equal scores open; transformers takes `topk`'s, which depends on
    the row's length and layout, dsv4 takes the earlier entry (the same whatever the row's length, so that
    prefill, decode and speculation agree). The oracle's choice is aligned here; where no score is 0
    this `topk` returns what torch's does."""
    from dsv4.model.compressor import zeros_in_entry_order

    topk = torch.Tensor.topk

    def ordered_topk(self, k, dim=-1, largest=True, sorted=True):
        if not (largest and self.is_floating_point() and dim in (-1, self.dim() - 1)):
            return topk(self, k, dim, largest, sorted)
        idx = topk(zeros_in_entry_order(self), k, dim, largest, sorted).indices
        return torch.return_types.topk((self.gather(-1, idx), idx))
    torch.Tensor.topk = ordered_topk
    try:
        yield
    finally:
        torch.Tensor.topk = topk


def assert_resume_refused(cfg, text: str, cases, capsys) -> None:
    """For each (old, new, named) of `cases`: `dsv4 train cfg --resume` with `old` replaced by `new` in the config
    `text` exits 2 naming every string of `named`, with the advice to restore them and no traceback."""
    from dsv4.cli import main

    for old, new, named in cases:
        cfg.write_text(text.replace(old, new))
        assert main(["train", str(cfg), "--resume"]) == 2, new
        err = capsys.readouterr().err
        assert all(n in err for n in named) and "restore these values" in err and "Traceback" not in err, err


@contextlib.contextmanager
def serving(app):
    """Run an ASGI app with uvicorn on a free localhost port in a thread; yields the base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"test server did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)

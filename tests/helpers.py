"""Shared test helpers: random non-trivial weights and the transformers oracle."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch

from dsv4.checkpoint import build_model, init_random
from dsv4.config import Config


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


def hf_model(path):
    from transformers import DeepseekV4ForCausalLM
    return DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


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

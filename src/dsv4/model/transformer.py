"""The DeepSeek-V4 stack: embedding -> n mHC streams -> blocks -> HC head -> norm -> head (+ MTP).

Parameter names follow DeepSeek's official checkpoint (architecture.md section 10), except
that routed experts are stacked per layer (`ffn.experts.w1` [E, I, d]).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from .attention import Attention
from .mhc import hc_head, hc_post, hc_pre
from .moe import MoE
from .norm import RMSNorm


def _hc_params(module: nn.Module, prefix: str, n: int, dim: int, width: int, n_scales: int):
    setattr(module, f"{prefix}_fn", nn.Parameter(torch.zeros(width, n * dim)))
    setattr(module, f"{prefix}_base", nn.Parameter(torch.zeros(width)))
    setattr(module, f"{prefix}_scale", nn.Parameter(torch.ones(n_scales)))


class Block(nn.Module):
    """One layer: mHC around attention, then mHC around MoE. X: [B, S, n, d]."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.hc_mult, cfg.hidden_size
        _hc_params(self, "hc_attn", n, d, (2 + n) * n, 3)
        _hc_params(self, "hc_ffn", n, d, (2 + n) * n, 3)
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn = MoE(cfg, cfg.is_hash_layer(layer))

    def _pre(self, X, which):
        c = self.cfg
        return hc_pre(X, getattr(self, f"hc_{which}_fn"), getattr(self, f"hc_{which}_base"),
                      getattr(self, f"hc_{which}_scale"), c.rms_norm_eps, c.hc_eps, c.hc_sinkhorn_iters)

    def forward(self, X: torch.Tensor, ids: torch.Tensor | None, segments: list | None = None) -> torch.Tensor:
        """X: [B, S, n, d] -> [B, S, n, d]; segments: see Attention.forward."""
        h, post, C = self._pre(X, "attn")
        X = hc_post(self.attn(self.attn_norm(h), segments), X, post, C)
        h, post, C = self._pre(X, "ffn")
        return hc_post(self.ffn(self.ffn_norm(h), ids), X, post, C)


class MTPBlock(Block):
    """Multi-token prediction module (`mtp.0`): predicts token t+2 from streams X_t and token t+1.

    X' = e_proj(enorm(Embed(ids'))) + h_proj(hnorm(X)) (broadcast over streams), then a
    sliding-window, top-k-routed Block, HC head, norm, and the shared output head."""

    def __init__(self, cfg: Config):
        super().__init__(cfg, cfg.num_hidden_layers)
        d = cfg.hidden_size
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        _hc_params(self, "hc_head", cfg.hc_mult, d, cfg.hc_mult, 1)

    def forward(self, X: torch.Tensor, e_next: torch.Tensor, ids: torch.Tensor,
                segments: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """X [B,S,n,d] main streams, e_next [B,S,d] embeddings of the next tokens -> (MTP streams, normed
        hidden [B,S,d] for the shared head)."""
        c = self.cfg
        Xm = self.e_proj(self.enorm(e_next)).unsqueeze(2) + self.h_proj(self.hnorm(X))
        Xm = super().forward(Xm, ids, segments)
        y = hc_head(Xm, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, c.rms_norm_eps, c.hc_eps)
        return Xm, self.norm(y)


class Transformer(nn.Module):
    """DeepSeek-V4. `forward(input_ids [B, S]) -> logits [B, S, vocab]` (fp32)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:  # one parameter, `embed.weight`
            self.head.weight = self.embed.weight
        _hc_params(self, "hc_head", cfg.hc_mult, d, cfg.hc_mult, 1)
        self.mtp = nn.ModuleList(MTPBlock(cfg) for _ in range(cfg.num_nextn_predict_layers))

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the embedding's). Not the first parameter's: a bf16 model keeps its
        mHC, norm, sink and ape parameters in fp32, as the reference does."""
        return self.embed.weight.dtype

    def _check_ids(self, ids: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            return
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [B, S] (got {tuple(ids.shape)} {ids.dtype})")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size)")

    def streams(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] -> final residual streams X [B, S, n, d] (before the HC head)."""
        self._check_ids(input_ids)
        e = self.embed(input_ids)
        X = e.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for layer in self.layers:
            X = layer(X, input_ids)
        return X

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        """Streams [B, S, n, d] -> logits [B, S, vocab] fp32, through the HC head, norm and output head."""
        c = self.config
        y = hc_head(X, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, c.rms_norm_eps, c.hc_eps)
        return F.linear(self.norm(y).float(), self.head.weight.float())

    def forward(self, input_ids: torch.Tensor, next_ids: torch.Tensor | None = None):
        """input_ids [B, S] -> logits [B, S, vocab]. With next_ids [B, S'] (the token after each of the
        first S' positions), also the MTP logits [B, S', vocab]: (logits, mtp_logits)."""
        X = self.streams(input_ids)
        if next_ids is None:
            return self.logits(X)
        return self.logits(X), self.mtp_logits(X[:, : next_ids.shape[1]], next_ids)

    def step(self, ids: list, caches: list, hooks: list | None = None) -> torch.Tensor:
        """Continue sequences: segment ids[j] (1-D int tensor of new tokens) extends caches[j] (a SequenceCache).

        All segments run as one flat batch (chunked prefill and decode mix freely); a cache may
        appear in several consecutive segments. hooks[j], if given, is called as hook("L{i}.", LayerCache)
        after segment j went through layer i (for snapshots). Caches advance. Returns the final
        streams [N, n, d] of all new tokens, back to back."""
        flat = torch.cat(ids).view(1, -1)
        self._check_ids(flat)
        hooks = hooks or [None] * len(ids)
        starts, ends = [], {}
        for c, t in zip(caches, ids):
            starts.append(ends.get(id(c), c.n))
            ends[id(c)] = starts[-1] + len(t)
        X = self.embed(flat).unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            segs = [(c.layers[i], n, len(t), h and functools.partial(h, f"L{i}."))
                    for c, n, t, h in zip(caches, starts, ids, hooks)]
            X = layer(X, flat, segs)
        for c in caches:
            c.n = ends[id(c)]
        return X[0]

    def mtp_step(self, X: torch.Tensor, next_ids: list, caches: list, hooks: list | None = None,
                 depth: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Incremental MTP over cached sequences: X [N, n, d] main streams of consecutive positions of
        each sequence (segments back to back, as returned by `step`), next_ids[j] the token after each
        position. Advances each cache's MTP layer (`mtp_n`). Returns (logits [N, vocab], MTP streams [N, n, d])."""
        m = self.mtp[depth]
        flat = torch.cat(next_ids).view(1, -1)
        hooks = hooks or [None] * len(next_ids)
        starts, ends = [], {}
        for c, t in zip(caches, next_ids):
            starts.append(ends.get(id(c), c.mtp_n))
            ends[id(c)] = starts[-1] + len(t)
        segs = [(c.mtp[depth], n, len(t), h and functools.partial(h, f"M{depth}."))
                for c, n, t, h in zip(caches, starts, next_ids, hooks)]
        Xm, y = m(X[None], self.embed(flat), flat, segs)
        for c in caches:
            c.mtp_n = ends[id(c)]
        return F.linear(y.float(), self.head.weight.float())[0], Xm[0]

    def mtp_logits(self, X: torch.Tensor, next_ids: torch.Tensor, depth: int = 0) -> torch.Tensor:
        """MTP: X [B, S, n, d] main streams, next_ids [B, S] (token t+1 at position t) -> logits for t+2."""
        if not len(self.mtp):
            raise ValueError("this model has no MTP module (num_nextn_predict_layers = 0)")
        self._check_ids(next_ids)
        _, y = self.mtp[depth](X, self.embed(next_ids), next_ids)
        return F.linear(y.float(), self.head.weight.float())

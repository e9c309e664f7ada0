"""DeepSeekMoE with hash-routed and sqrt-softplus top-k experts (architecture.md section 7).

Affinity s = sqrt(softplus(x W_g^T)) (fp32). Hash layers pick experts by tid2eid[token];
others by topk(s + bias) (the bias steers selection only). Weights g = s[idx] / sum s[idx]
* route_scale. Each expert is a clamped SwiGLU; a shared expert is always added.
Routed experts run on tokens grouped per expert: one matmul per active expert, no loop over tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..quant import dequant_fp4_weight


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """SiLU(min(x W1^T, limit)) * clip(x W3^T, -limit, limit), in fp32. x: [N,d], w1/w3: [I,d] -> [N,I]."""
    gate = F.linear(x, w1).float().clamp(max=limit)
    up = F.linear(x, w3).float().clamp(-limit, limit)
    return F.silu(gate) * up


class Gate(nn.Module):
    """Router. `weight` [E, d]; `bias` [E] on top-k layers or `tid2eid` [vocab, k] on hash layers."""

    def __init__(self, cfg: Config, hash_layer: bool):
        super().__init__()
        self.topk, self.score_func, self.hash = cfg.num_experts_per_tok, cfg.scoring_func, hash_layer
        self.route_scale, self.norm_topk = cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if hash_layer:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
        else:
            # auxiliary-loss-free balancing bias: steers selection only, updated outside the optimiser
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, d], ids: [N] -> weights [N, k] fp32, expert indices [N, k]."""
        logits = F.linear(x.float(), self.weight.float())
        if self.score_func == "sqrtsoftplus":
            s = F.softplus(logits).sqrt()
        elif self.score_func == "sigmoid":
            s = logits.sigmoid()
        else:
            s = logits.softmax(-1)
        if self.training:
            self.scores = s  # kept for the sequence-wise balance loss
        if self.hash:
            if ids is None:
                raise ValueError("hash-routed MoE layers need the input token ids")
            idx = self.tid2eid[ids]
        else:
            idx = (s + self.bias.float()).topk(self.topk, dim=-1).indices
        g = s.gather(1, idx)
        if self.norm_topk:
            g = g / g.sum(-1, keepdim=True)
        return g * self.route_scale, idx


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE's sequence-wise balance loss, sum_i f_i P_i averaged over sequences.

    scores [B, S, E] affinities, idx [B, S, k] selected experts. f_i = E / (k S) * #tokens routed to i,
    P_i = mean over tokens of the normalised affinity s_i / sum_j s_j. Equals 1 when perfectly balanced."""
    B, S, E = scores.shape
    k = idx.shape[-1]
    f = torch.zeros(B, E, device=scores.device).scatter_add_(1, idx.reshape(B, -1),
                                                             torch.ones(B, S * k, device=scores.device))
    f = f * E / (k * S)
    P = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return (f * P).sum(-1).mean()


class Experts(nn.Module):
    """Routed experts stacked: w1, w3 [E, I, d], w2 [E, d, I]."""

    def __init__(self, n: int, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(n, inter, dim))
        self.w2 = nn.Parameter(torch.zeros(n, dim, inter))
        self.w3 = nn.Parameter(torch.zeros(n, inter, dim))

    def weights(self, e: int, dtype: torch.dtype):
        return self.w1[e], self.w2[e], self.w3[e]

    def stacked(self, dtype: torch.dtype):
        """All experts' (w1, w2, w3) in `dtype`."""
        return self.w1.to(dtype), self.w2.to(dtype), self.w3.to(dtype)


class PackedExperts(nn.Module):
    """Routed experts kept in the official packed FP4 layout and dequantised per use.

    w{1,3}_packed [E, I, d/2] int8 with w{1,3}_scale [E, I, d/32]; w2_packed [E, d, I/2], w2_scale [E, d, I/32]."""

    def __init__(self, packed: dict[str, torch.Tensor]):
        super().__init__()
        for k, v in packed.items():
            self.register_buffer(k, v)

    def weights(self, e: int, dtype: torch.dtype):
        return tuple(dequant_fp4_weight(getattr(self, f"w{i}_packed")[e], getattr(self, f"w{i}_scale")[e], dtype)
                     for i in (1, 2, 3))


class SharedExpert(nn.Module):
    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(x, self.w1.weight, self.w3.weight, self.limit).to(x.dtype))


class MoE(nn.Module):
    def __init__(self, cfg: Config, hash_layer: bool):
        super().__init__()
        self.limit, self.n_experts = cfg.swiglu_limit, cfg.n_routed_experts
        self.gate = Gate(cfg, hash_layer)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (SharedExpert(cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)
                               if cfg.n_shared_experts else None)
        self.last_load = None  # tokens per expert in the last training forward (for bias balancing)
        self.balance_loss = None  # sequence-wise balance loss of the last training forward (top-k layers)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """x: [B, S, d], ids: [B, S] -> [B, S, d]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        g, idx = self.gate(x, None if ids is None else ids.reshape(-1))
        k = idx.shape[1]
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        load = flat.new_zeros(self.n_experts).scatter_add_(0, flat, torch.ones_like(flat))  # static shape
        if self.training:
            self.last_load = load
            if not self.gate.hash and len(shape) == 3:
                self.balance_loss = sequence_balance_loss(self.gate.scores.view(shape[0], shape[1], -1),
                                                          idx.view(shape[0], shape[1], -1))
        counts = load.tolist()
        tok = order // k
        gw = g.flatten()[order]
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if torch.compiler.is_compiling():  # sizes are symbolic there: state what holds
                torch._check(n >= 0)
                torch._check(start + n <= tok.shape[0])
            elif n == 0:
                continue
            t, w = tok[start:start + n], gw[start:start + n]
            start += n
            w1, w2, w3 = self.experts.weights(e, x.dtype)
            h = swiglu(x[t], w1, w3, self.limit) * w[:, None]
            y.index_add_(0, t, F.linear(h.to(x.dtype), w2).float())
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)

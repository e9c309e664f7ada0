"""DeepSeekMoE with hash-routed and sqrt-softplus top-k experts (architecture.md section 7).

Affinity s = sqrt(softplus(x W_g^T)) (fp32). Hash layers pick experts by tid2eid[token];
others by topk(s + bias) (the bias steers selection only). Weights g = s[idx] / sum s[idx]
* route_scale. Each expert is a clamped SwiGLU; a shared expert is always added.
Routed experts run on tokens grouped per expert: each expert's weights are read once per forward. On
the CPU as one grouped matrix product per projection (`grouped_linear`, static shapes, so a compiled
graph needs no data-dependent sizes); elsewhere as one matmul per active expert.
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


def _native_grouped(*ts: torch.Tensor) -> bool:
    """torch._grouped_mm needs row strides that are multiples of 16 bytes (else: one matmul per group)."""
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in ts)


def _groups(offs: torch.Tensor):
    ends = offs.tolist()
    return zip([0] + ends[:-1], ends)


@torch.library.custom_op("dsv4::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[g-1]:offs[g] of x [M, K] (offs[-1] = 0) times w[g]^T; w [G, N, K] (nn.Linear layout),
    offs [G] int32 cumulative row counts -> [M, N]. Rows past offs[G-1] are zero. CPU tensors."""
    if _native_grouped(x, w):
        if not (w.is_contiguous() or w.transpose(1, 2).is_contiguous()):
            w = w.contiguous()
        return torch._grouped_mm(x.contiguous(), w.transpose(1, 2), offs=offs)
    y = x.new_zeros(x.shape[0], w.shape[1])
    for g, (a, b) in enumerate(_groups(offs)):
        y[a:b] = x[a:b] @ w[g].T
    return y


@torch.library.custom_op("dsv4::grouped_linear_weight_grad", mutates_args=())
def _grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grad [M, N], x [M, K] -> per group grad_g^T x_g [G, N, K]."""
    if _native_grouped(grad, x):
        return torch._grouped_mm(grad.contiguous().t(), x.contiguous(), offs=offs)
    return torch.stack([grad[a:b].T @ x[a:b] for a, b in _groups(offs)])


@grouped_linear.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[1])


@_grouped_weight_grad.register_fake
def _(grad, x, offs):
    return x.new_empty(offs.shape[0], grad.shape[1], x.shape[1])


def _grouped_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    gx = grouped_linear(grad, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    gw = _grouped_weight_grad(grad, x, offs) if ctx.needs_input_grad[1] else None
    return gx, gw, None


grouped_linear.register_autograd(_grouped_backward, setup_context=_grouped_setup)


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
        tok = order // k
        gw = g.flatten()[order]
        if x.device.type == "cpu" and isinstance(self.experts, Experts):
            y = self._grouped(x, tok, gw, load)
        else:
            y = self._per_expert(x, tok, gw, load)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)

    def _grouped(self, x: torch.Tensor, tok: torch.Tensor, gw: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
        """x [N, d]; the N*k assignments sorted by expert: token tok, weight gw; load [E] -> fp32 [N, d]."""
        (w1, w2, w3), offs = self.experts.stacked(x.dtype), load.cumsum(0).to(torch.int32)
        xs = x[tok]
        gate = grouped_linear(xs, w1, offs).float().clamp(max=self.limit)
        up = grouped_linear(xs, w3, offs).float().clamp(-self.limit, self.limit)
        h = (F.silu(gate) * up * gw[:, None]).to(x.dtype)
        out = grouped_linear(h, w2, offs).float()
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, out)

    def _per_expert(self, x: torch.Tensor, tok: torch.Tensor, gw: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
        """The same, one matmul per active expert (packed FP4 experts, other devices)."""
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(load.tolist()):
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
        return y

"""Muon for matrix parameters, AdamW for the rest (architecture.md section 12).

Muon: Nesterov momentum, then the update is orthogonalised with a hybrid Newton-Schulz iteration
(8 steps with (3.4445, -4.7750, 2.0315), then 2 with (2, -1.5, 0.5)), rescaled by
`rms_scale * sqrt(max(rows, cols))` so its RMS matches AdamW's (~0.2), with decoupled weight decay.
Stacked expert weights [E, out, in] are orthogonalised per expert, and the grouped output projection
`wo_a` ([G * o_lora_rank, in], G independent matrices: attention.py applies row block g to head group g)
per group: the steepest descent of a block-diagonal map under the spectral norm is block by block.
"""
from __future__ import annotations

import torch

from ..model.attention import Attention

NS_STEPS = [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2


def newton_schulz(G: torch.Tensor, steps=NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T. G: [..., m, n] -> same shape (fp32, or fp64 for fp64 input)."""
    X = G.double() if G.dtype == torch.float64 else G.float()
    transpose = X.shape[-2] > X.shape[-1]
    if transpose:
        X = X.transpose(-1, -2)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in steps:
        A = X @ X.transpose(-1, -2)
        X = a * X + (b * A + c * A @ A) @ X
    return X.transpose(-1, -2) if transpose else X


class Muon(torch.optim.Optimizer):
    """Muon for parameters of 2 or more dims (the last two are the matrix; leading dims stack matrices).

    blocks: {parameter: G} for a 2-D parameter [G * r, in] used as G separate [r, in] matrices (row blocks),
    orthogonalised one by one like stacked experts (`grouped_matrices` gives the model's)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.1,
                 rms_scale: float = 0.2, nesterov: bool = True, blocks: dict | None = None):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"invalid Muon hyperparameters: lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, rms_scale=rms_scale,
                                      nesterov=nesterov))
        self.blocks = dict(blocks or {})  # not optimiser state: checkpoints stay as they were

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() < 2:
                    raise ValueError("Muon handles matrices only; give vectors to AdamW (see param_groups)")
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p, dtype=torch.float32))
                g = p.grad.float()
                buf.mul_(group["momentum"]).add_(g)
                u = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                sharded = hasattr(u, "full_tensor")  # FSDP2: orthogonalise the whole matrix, keep our shard
                full = u.full_tensor() if sharded else u
                mats = full.reshape(self.blocks[p], -1, full.shape[-1]) if p in self.blocks else full
                scale = group["rms_scale"] * max(mats.shape[-2], mats.shape[-1]) ** 0.5
                full = (newton_schulz(mats) * scale).reshape(full.shape)
                if sharded:
                    from torch.distributed.tensor import distribute_tensor

                    full = distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(full.to(p.dtype), alpha=-group["lr"])
        return loss


_ADAMW_NAMES = ("embed.weight", "head.weight", "attn_sink", ".ape")


def param_groups(model: torch.nn.Module) -> tuple[list, list]:
    """(Muon parameters, AdamW parameters): matrices go to Muon except the embedding, the output head and
    the compressor position biases; norms, mHC bases/scales and sinks (vectors) go to AdamW."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and not name.endswith(_ADAMW_NAMES)
        (muon if is_matrix else adamw).append(p)
    return muon, adamw


def grouped_matrices(model: torch.nn.Module) -> dict:
    """{parameter: G} for each attention's grouped output projection wo_a [G * o_lora_rank, in]: group g's
    matrix is rows g * o_lora_rank to (g + 1) * o_lora_rank (attention.py's `wo_a.weight.view(G, -1, in)`)."""
    return {m.wo_a._parameters["weight"]: m.cfg.o_groups for m in model.modules()  # QATLinear: the parameter
            if isinstance(m, Attention) and m.cfg.o_groups > 1}


def optimizers(model: torch.nn.Module, lr_muon: float, lr_adamw: float, weight_decay: float) -> list:
    """[Muon over the matrices (grouped ones per group), AdamW (betas 0.9, 0.95, no decay) over the rest] as
    `param_groups` splits them."""
    muon, adamw = param_groups(model)
    return [Muon(muon, lr=lr_muon, weight_decay=weight_decay, blocks=grouped_matrices(model)),
            torch.optim.AdamW(adamw, lr=lr_adamw, weight_decay=0.0, betas=(0.9, 0.95))]

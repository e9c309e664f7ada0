"""Quantisation-aware training in the official storage formats (architecture.md sections 8 and 12).

FP4: each routed expert's w1/w2/w3 is used as its FP4 e2m1 value (UE8M0 scale per 32 inputs).
FP8 (optional): the linears the official checkpoint stores in FP8 (attention projections, indexer
wq_b, shared experts, MTP e_proj/h_proj) are used as their e4m3 value with 128x128 UE8M0 block scales.
Gradients pass straight through to the full-precision weights, and `save_official` then exports
exactly the weights the model trained with.
"""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import _FP8_LEAVES
from ..model.moe import Experts
from ..quant import dequant_fp8_weight, fp4_quant_dequant, quant_fp8_weight


def fake_fp4(w: torch.Tensor) -> torch.Tensor:
    """w [..., K] -> its FP4 value (per-32 blocks along K) with a straight-through gradient."""
    return w + (fp4_quant_dequant(w.detach(), 32) - w).detach()


def fake_fp8(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] -> its official FP8 value (e4m3, 128x128 UE8M0 blocks) with a straight-through gradient."""
    return w + (dequant_fp8_weight(*quant_fp8_weight(w.detach()), dtype=w.dtype) - w).detach()


class QATLinear(nn.Linear):
    """A linear whose `weight` reads as its FP8 value (also where a module uses the weight directly)."""

    @property
    def weight(self) -> torch.Tensor:
        return fake_fp8(self._parameters["weight"])


class QATExperts(Experts):
    """Experts whose weights are fake-quantised to FP4 on every use."""

    def weights(self, e: int, dtype: torch.dtype):
        return fake_fp4(self.w1[e]), fake_fp4(self.w2[e]), fake_fp4(self.w3[e])

    def stacked(self, dtype: torch.dtype):
        return fake_fp4(self.w1).to(dtype), fake_fp4(self.w2).to(dtype), fake_fp4(self.w3).to(dtype)


def enable_fp4_qat(model: torch.nn.Module, fp8: bool = False) -> torch.nn.Module:
    """Switch every routed-expert module of `model` to FP4 fake quantisation, and with fp8 the official
    FP8 linears to FP8 fake quantisation (in place; same parameters and state_dict)."""
    for name, m in model.named_modules():
        if type(m) is Experts:
            m.__class__ = QATExperts
        elif fp8 and type(m) is nn.Linear and _FP8_LEAVES.search(name + ".weight"):
            m.__class__ = QATLinear
    return model

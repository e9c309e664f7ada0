"""FP4 quantisation-aware training of the routed experts (architecture.md sections 8 and 12).

With QAT on, each routed expert's w1/w2/w3 is used as its FP4 e2m1 value (UE8M0 scale per 32
inputs, the official storage format) in the forward pass, with a straight-through gradient to the
full-precision weight. `save_official` then exports exactly the weights the model trained with.
"""
from __future__ import annotations

import torch

from ..model.moe import Experts
from ..quant import fp4_quant_dequant


def fake_fp4(w: torch.Tensor) -> torch.Tensor:
    """w [..., K] -> its FP4 value (per-32 blocks along K) with a straight-through gradient."""
    return w + (fp4_quant_dequant(w.detach(), 32) - w).detach()


class QATExperts(Experts):
    """Experts whose weights are fake-quantised to FP4 on every use."""

    def weights(self, e: int, dtype: torch.dtype):
        return fake_fp4(self.w1[e]), fake_fp4(self.w2[e]), fake_fp4(self.w3[e])


def enable_fp4_qat(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every routed-expert module of `model` to FP4 fake quantisation (in place; same parameters)."""
    for m in model.modules():
        if type(m) is Experts:
            m.__class__ = QATExperts
    return model

"""FP8 / FP4 formats of DeepSeek-V4 (architecture.md sections 5, 8 and 10).

- FP8 e4m3 weights with one UE8M0 (power-of-two) scale per 128x128 block.
- FP4 e2m1 routed-expert weights, packed two per byte along K (low nibble = even
  index), one UE8M0 scale per 1x32 block along K.
- Quant-dequant simulations of the reference: FP8 (block 64) on the KV nope dims,
  Hadamard + FP4 (block 32) on the indexer q/k.
"""
from __future__ import annotations

import math

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
# e2m1 code -> value; codes 8..15 are the negatives of 0..7
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
# Midpoints between consecutive magnitudes and the code a tie rounds to (even mantissa bit).
_FP4_MID = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_FP4_TIE_UP = torch.tensor([False, True, False, True, False, True, False])
_CHUNK = 1 << 20  # values quantised to FP4 at a time


def ue8m0_scale(amax: torch.Tensor, qmax: float, floor: float) -> torch.Tensor:
    """Power-of-two scale 2^ceil(log2(max(amax, floor) / qmax)) (UE8M0)."""
    return torch.exp2(torch.ceil(torch.log2(amax.float().clamp(min=floor) / qmax)))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the block size {block}")
    return x.float().unflatten(-1, (-1, block))


def fp8_quant(x: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., K] -> (e4m3 [..., K], UE8M0 scales [..., K/block] as float8_e8m0fnu). Scale floor 1e-4/448."""
    xb = _blocks(x, block)
    s = ue8m0_scale(xb.abs().amax(-1, keepdim=True), FP8_MAX, 1e-4)
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), s.squeeze(-1).to(torch.float8_e8m0fnu)


def fp8_dequant(q: torch.Tensor, s: torch.Tensor, block: int = 64, dtype=torch.float32) -> torch.Tensor:
    return (q.float().unflatten(-1, (-1, block)) * s.float().unsqueeze(-1)).flatten(-2).to(dtype)


def fp8_quant_dequant(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Simulate FP8 e4m3 with a UE8M0 scale per `block` values along the last dim. [..., K] -> same, x's dtype."""
    return fp8_dequant(*fp8_quant(x, block), block, x.dtype)


def fp4_round(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values in [-6, 6] to the nearest e2m1 value (ties to even code). Returns codes 0..15 (uint8).
    Temporaries of 1 and 4 bytes a value, not 8."""
    mag = v.abs()
    mid = _FP4_MID.to(v.device)
    code = torch.bucketize(mag, mid, out_int32=True)  # magnitude index 0..7; ties land on the lower side
    at = code.clamp(max=6)  # (magnitudes of index 7 lie above the last midpoint: never a tie)
    tie = (mag == mid[at]) & _FP4_TIE_UP.to(v.device)[at]
    del mag, at
    code = (code + tie).to(torch.uint8)
    return code.add_((v < 0).to(torch.uint8) * 8)


def fp4_quant(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., K] -> (codes [..., K] uint8 in 0..15, scales [..., K/block] fp32 powers of two).
    A large x (a routed expert's weight) is done 2^20 values at a time: temporaries stay ~25 MB."""
    if x.numel() > _CHUNK and x.dim() >= 2 and not torch.compiler.is_compiling():
        flat, rows = x.reshape(-1, x.shape[-1]), max(1, _CHUNK // max(x.shape[-1], 1))
        parts = [fp4_quant(flat[i:i + rows], block) for i in range(0, flat.shape[0], rows)]
        return (torch.cat([c for c, _ in parts]).view(x.shape),
                torch.cat([s for _, s in parts]).view(*x.shape[:-1], -1))
    xb = _blocks(x, block)
    s = ue8m0_scale(xb.abs().amax(-1, keepdim=True), FP4_MAX, FP4_MAX * 2.0 ** -126)
    codes = fp4_round((xb / s).clamp_(-FP4_MAX, FP4_MAX))
    return codes.flatten(-2), s.squeeze(-1)


def fp4_dequant(codes: torch.Tensor, scales: torch.Tensor, block: int = 32, dtype=torch.float32) -> torch.Tensor:
    """codes [..., K] (0..15), scales [..., K/block] -> values [..., K]."""
    v = FP4_VALUES.to(codes.device)[codes.int()].unflatten(-1, (-1, block))  # a new tensor: scaled in place
    return v.mul_(scales.float().unsqueeze(-1)).flatten(-2).to(dtype)


def fp4_quant_dequant(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Simulate FP4 e2m1 with a UE8M0 scale per `block` values (OFF-K fp4_act_quant). Same shape and dtype."""
    codes, s = fp4_quant(x, block)
    return fp4_dequant(codes, s, block, x.dtype)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., K] -> int8 [..., K/2], two per byte, low nibble = even index."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [..., K/2] -> codes [..., K] (uint8)."""
    p = packed.view(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)


def dequant_fp4_weight(packed: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Official routed-expert weight: packed [out, in/2] + scale [out, in/32] (e8m0) -> [out, in]."""
    return fp4_dequant(unpack_fp4(packed), scale.float(), 32, dtype)


def dequant_fp8_weight(w: torch.Tensor, scale: torch.Tensor, block: int = 128, dtype=torch.float32) -> torch.Tensor:
    """Official FP8 weight [out, in] with scale [ceil(out/128), ceil(in/128)] -> [out, in]."""
    out, inn = w.shape
    s = scale.float().repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inn]
    return (w.float() * s).to(dtype)


def quant_fp8_weight(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (e4m3 [out, in], e8m0 scale [ceil(out/128), ceil(in/128)]). Inverse of dequant_fp8_weight."""
    out, inn = w.shape
    po, pi = -out % block, -inn % block
    wp = torch.nn.functional.pad(w.float(), (0, pi, 0, po))
    blocks = wp.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [ob, 128, ib, 128]
    s = ue8m0_scale(blocks.abs().amax(dim=(1, 3)), FP8_MAX, 1e-4)  # [ob, ib]
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).flatten(2).flatten(0, 1)[:out, :inn]
    return q.to(torch.float8_e4m3fn), s.to(torch.float8_e8m0fnu)


def quant_fp4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (packed int8 [out, in/2], e8m0 scale [out, in/32]). Inverse of dequant_fp4_weight."""
    codes, s = fp4_quant(w, 32)
    return pack_fp4(codes), s.to(torch.float8_e8m0fnu)


def hadamard(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sylvester-order Walsh-Hadamard matrix scaled by n^-1/2 (orthogonal, symmetric). n a power of two."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two (got {n})")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device=device, dtype=dtype)


def rotate_fp4(x: torch.Tensor) -> torch.Tensor:
    """Indexer q/k quantisation point: Hadamard over the last dim, then FP4 quant-dequant (block 32)."""
    h = hadamard(x.shape[-1], x.device, torch.float32)
    return fp4_quant_dequant(x.float() @ h, 32).to(x.dtype)

"""Partial interleaved RoPE with YaRN frequencies (architecture.md section 3).

The rotation covers the *last* `rope_dim` channels; pair (x[2i], x[2i+1]) of that slice
is rotated by pos * theta_i. Plain RoPE (base 10000) on sliding-only and MTP layers;
base 160000 with YaRN on compressed layers and their compressors / indexer. No YaRN
magnitude scaling.
"""
from __future__ import annotations

import math

import torch


def inv_freq(rope_dim: int, base: float, factor: float = 1.0, original_len: int = 65536,
             beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """theta_i for i < rope_dim/2, fp32. With factor > 1, YaRN: theta_i * (s_i + (1 - s_i)/factor)."""
    theta = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device="cpu") / rope_dim))
    if factor == 1.0:
        return theta

    def corr(b):  # dimension index whose wavelength completes b rotations over original_len
        return rope_dim * math.log(original_len / (b * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(corr(beta_fast)), 0)
    hi = min(math.ceil(corr(beta_slow)), rope_dim - 1)
    if hi == lo:
        hi += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
    s = 1 - ramp
    return theta / factor * (1 - s) + theta * s


class Rope(torch.nn.Module):
    """cos/sin tables for one frequency set; `rotate` applies them to the trailing rope slice."""

    def __init__(self, rope_dim: int, base: float, factor: float = 1.0, original_len: int = 65536,
                 beta_fast: float = 32.0, beta_slow: float = 1.0):
        super().__init__()
        self.rope_dim = rope_dim
        # a plain attribute, not a buffer: it is derived from the config, never saved or loaded
        self.inv_freq = inv_freq(rope_dim, base, factor, original_len, beta_fast, beta_slow)

    def cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: [...] int -> cos, sin: [..., rope_dim/2] fp32."""
        if self.inv_freq.device != pos.device:
            self.inv_freq = self.inv_freq.to(pos.device)
        f = pos.float()[..., None] * self.inv_freq
        return f.cos(), f.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate the trailing 2*cos.shape[-1] channels of x. x: [..., D]; cos/sin broadcast to [..., r/2].

        inverse=True rotates by -pos (the output de-rotation)."""
        r = 2 * cos.shape[-1]
        nope, rope = x[..., :-r], x[..., -r:].float()
        a, b = rope[..., 0::2], rope[..., 1::2]
        if inverse:
            sin = -sin
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2).to(x.dtype)
        return torch.cat([nope, out], dim=-1)

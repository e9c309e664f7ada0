"""FP8 / FP4 formats against hand-computed cases (architecture.md sections 5, 8, 10)."""
import pytest
import torch

from dsv4.quant import (dequant_fp4_weight, dequant_fp8_weight, fp4_quant_dequant, fp8_quant_dequant, hadamard,
                        pack_fp4, quant_fp4_weight, quant_fp8_weight, rotate_fp4, unpack_fp4)


def test_fp8_block64_hand_computed():
    x = torch.zeros(64)
    x[:4] = torch.tensor([896.0, 3.0, 1.0001, -0.3])
    # amax 896 -> scale 2^ceil(log2(896/448)) = 2; 3/2=1.5 exact; 1.0001/2 -> 0.5; -0.3/2=-0.15 -> -0.15625 (step 1/64)
    y = fp8_quant_dequant(x, 64)
    assert y[:4].tolist() == [896.0, 3.0, 1.0, -0.3125]
    assert torch.all(y[4:] == 0)


def test_fp8_scale_is_per_block():
    x = torch.cat([torch.full((64,), 1000.0), torch.full((64,), 0.001)])
    y = fp8_quant_dequant(x, 64)
    # second block has its own small scale: 0.001 survives with < 1/16 relative error
    assert abs(y[64].item() - 0.001) / 0.001 < 1 / 16
    assert y[0].item() == 1024.0  # scale 4; 1000/4 = 250 rounds to 256 (e4m3 step 16 in [128, 256))


def test_fp4_e2m1_rounding_hand_computed():
    x = torch.zeros(32)
    x[:8] = torch.tensor([12.0, 5.0, 7.0, 1.5, 0.5, 11.0, -2.6, 0.9])
    # amax 12 -> scale 2^ceil(log2(12/6)) = 2; halves: 6, 2.5(tie->2), 3.5(tie->4), .75(tie->1), .25(tie->0),
    # 5.5(->6), -1.3(->-1.5), .45(->.5)
    y = fp4_quant_dequant(x, 32)
    assert y[:8].tolist() == [12.0, 4.0, 8.0, 2.0, 0.0, 12.0, -3.0, 1.0]


def test_fp4_pack_layout_low_nibble_is_even_index():
    codes = torch.tensor([[1, 2, 15, 0]])
    packed = pack_fp4(codes)
    assert packed.dtype == torch.int8
    assert packed.view(torch.uint8).tolist() == [[0x21, 0x0F]]
    assert unpack_fp4(packed).tolist() == codes.tolist()


def test_fp4_large_tensor_quantised_in_chunks_equals_row_by_row():
    """Over 2^20 values (an expert weight) fp4_quant works in row chunks (the last one partial); codes, scales
    and their shapes equal quantising each row alone, and a tie on a scaled midpoint still rounds to even."""
    from dsv4.quant import fp4_quant
    x = torch.randn(3, 350, 1024, generator=torch.Generator().manual_seed(0))  # 1.08M values
    x[1, 7, :2] = torch.tensor([6.0, 1.25])  # scale 1: 1.25 is a midpoint -> 1.0 (even code)
    codes, s = fp4_quant(x, 32)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and s.shape == (3, 350, 32)
    want = [fp4_quant(row, 32) for row in x.reshape(-1, 1024)]
    assert torch.equal(codes.reshape(-1, 1024), torch.stack([c for c, _ in want]))
    assert torch.equal(s.reshape(-1, 32), torch.stack([t for _, t in want]))
    assert codes[1, 7, 1].item() == 2  # the code of 1.0


def test_fp4_weight_roundtrip_on_representable_values():
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6, 6])
    # two 32-blocks per row, with scales 2^ceil(log2(1.5/6)) = 1/4 and 2^ceil(log2(24/6)) = 4
    w = torch.cat([grid * 0.25, grid * 0.25, grid * 4, grid * 4]).repeat(3, 1)  # [3, 64]
    q, s = quant_fp4_weight(w)
    assert q.shape == (3, 32) and s.shape == (3, 2) and s.dtype == torch.float8_e8m0fnu
    assert torch.equal(dequant_fp4_weight(q, s), w)


def test_fp8_weight_block_scales():
    w = torch.randn(200, 130)
    w[:128, :128] *= 100
    q, s = quant_fp8_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 2)
    back = dequant_fp8_weight(q, s)
    rel = ((back - w).abs() / w.abs().clamp(min=1e-3)).median()
    assert rel < 0.04
    assert s.float()[0, 0] > s.float()[1, 1]  # the scaled-up block got a bigger scale


def test_hadamard_is_sylvester_orthonormal():
    h2 = hadamard(2)
    assert torch.allclose(h2, torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / 2 ** 0.5)
    h = hadamard(128)
    assert torch.allclose(h @ h.T, torch.eye(128), atol=1e-6)
    with pytest.raises(ValueError):
        hadamard(96)


def test_rotate_fp4_preserves_inner_products_approximately():
    torch.manual_seed(0)
    q, k = torch.randn(16, 128), torch.randn(16, 128)
    exact = (q * k).sum(-1)
    approx = (rotate_fp4(q) * rotate_fp4(k)).sum(-1)
    assert torch.corrcoef(torch.stack([exact, approx]))[0, 1] > 0.95

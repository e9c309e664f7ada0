"""Parameter counts and KV bytes against architecture.md sections 1 and 9, and `dsv4 inspect`."""
import pytest

import dsv4
from dsv4.checkpoint import build_model
from dsv4.cli import main
from dsv4.footprint import kv_bytes_at, kv_bytes_per_token, param_counts, prefill_flops, v32_bytes_per_token

# section 9 table: (convention, V3.2, Pro, Flash) bytes per token
TABLE = [("A", 46848, 4939.5, 3450), ("B", 48068, 5031, 3514), ("B'", 48068, 5511, 3850), ("C", 85888, 9848, 6880)]


@pytest.mark.parametrize("conv,v32,pro,flash", TABLE)
def test_kv_bytes_per_token_equal_the_architecture_table(conv, v32, pro, flash):
    assert v32_bytes_per_token(conv) == v32
    assert round(kv_bytes_per_token(dsv4.Config.pro(), conv)) == round(pro)
    assert round(kv_bytes_per_token(dsv4.Config.flash(), conv)) == round(flash)


def test_one_million_context_totals():
    # section 9: at 2^20 tokens, Pro 5.18 GB and Flash 3.62 GB (convention A); windows add ~4.4 / 3.1 MiB
    pro = kv_bytes_at(dsv4.Config.pro(), 1 << 20)
    flash = kv_bytes_at(dsv4.Config.flash(), 1 << 20)
    assert round(pro / 1e9, 2) == 5.18 and round(flash / 1e9, 2) == 3.62
    assert round((pro - 4939.5 * (1 << 20)) / 2**20, 1) == 4.4
    assert round((flash - 3450 * (1 << 20)) / 2**20, 1) == 3.1


def test_param_counts_match_the_published_sizes():
    flash, pro = param_counts(dsv4.Config.flash()), param_counts(dsv4.Config.pro())
    assert round(flash["total"] / 1e9, 1) == 284.3 and round(flash["active"] / 1e9, 1) == 13.8
    assert round(flash["total_with_mtp"] / 1e9, 1) == 290.9 and round(flash["active_with_mtp"] / 1e9, 1) == 14.1
    assert round(pro["total"] / 1e12, 3) == 1.573 and round(pro["active"] / 1e9, 1) == 49.8


def test_kv_bytes_below_the_window_count_only_the_tokens_held():
    # tiny: window 16, 4 layers (SWA, CSA, HCA, CSA) + 1 MTP, nope 48, rope 16, indexer dim 32; 10 tokens
    cfg = dsv4.Config.tiny()
    e_main, e_idx = 48 + 2 * 16, 32 / 2  # convention A: FP8 nope + BF16 rope; FP4 indexer key
    csa = 2 * (10 // 4) * (e_main + e_idx)  # two CSA layers, 2 entries each; HCA (m' = 16): none yet
    windows = 5 * 10 * e_main  # every layer's window holds the 10 tokens, not 16 slots
    assert kv_bytes_at(cfg, 10) == csa + windows == 4384


def test_prefill_flops_by_hand():
    """S = 40 on tiny (window 16, CSA m = 4 with top-k 8, HCA m' = 16): section 4's keys per query, 2 FLOPs per
    multiply-add."""
    cfg = dsv4.Config.tiny(num_nextn_predict_layers=0)
    d, V, H, c, L = 64, 512, 4, 64, 4
    m = build_model(cfg)
    total = sum(p.numel() for p in m.parameters()) + sum(b.numel() for k, b in m.named_buffers()
                                                          if k.endswith("gate.bias"))
    active = total - L * (8 - 2) * 3 * d * 32  # 6 of 8 routed experts idle per token (3 d x I matrices each)
    dense = 2 * (active - 2 * V * d) + 2 * V * d  # every weight once per token; the embedding lookup is free
    # keys of query t (n = t + 1 = 1..40):
    window = sum(range(1, 17)) + 24 * 16  # min(n, 16): 136 + 384 = 520 in every layer
    hca = 16 * 1 + 9 * 2  # floor(n / 16): 1 for n = 16..31, 2 for n = 32..40
    vis = 4 * (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9) + 10  # floor(n / 4) summed: 190 visible CSA entries
    csa = 4 * (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8) + 4 * 8 + 8  # min(floor(n / 4), 8): 184
    keys = 4 * window + hca + 2 * csa  # SWA, CSA, HCA, CSA
    attn = 2 * 2 * H * c * keys  # QK and PV, each H heads x c dims
    idx = 2 * 4 * 32 * 2 * vis  # the indexer's 4 heads x 32 dims score every visible entry in both CSA layers
    assert prefill_flops(cfg, 40) == 40 * dense + attn + idx


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_equals_the_built_model(tied):
    cfg = dsv4.Config.tiny(tie_word_embeddings=tied)  # tied: the head is the embedding, counted once
    m = build_model(cfg)
    n = sum(p.numel() for p in m.parameters()) + sum(b.numel() for k, b in m.named_buffers()
                                                      if k.endswith("gate.bias"))
    assert n == param_counts(cfg)["total_with_mtp"]


def test_inspect_prints_the_table(capsys, tmp_path):
    assert main(["inspect", "flash"]) == 0
    out = capsys.readouterr().out
    assert "284.33B" in out and "3,450.0" in out and "46,848" in out and "7.4%" in out
    (tmp_path / "config.json").write_text(__import__("json").dumps(dsv4.Config.tiny().to_hf_dict()))
    assert main(["inspect", str(tmp_path), "--context", "4096"]) == 0
    assert main(["inspect", "missing-preset"]) == 2
    assert "not a preset" in capsys.readouterr().err

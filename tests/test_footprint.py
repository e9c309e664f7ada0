"""Parameter counts and KV bytes against architecture.md sections 1 and 9, and `dsv4 inspect`."""
import pytest

import dsv4
from dsv4.checkpoint import build_model
from dsv4.cli import main
from dsv4.footprint import kv_bytes_at, kv_bytes_per_token, param_counts, v32_bytes_per_token

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

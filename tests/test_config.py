"""Both config.json styles, presets, and validation errors that name the field."""
import copy

import pytest

import dsv4
from dsv4.config import CSA, HCA, SLIDING, Config, ConfigError

FLASH_HF = {  # the fields a published Flash config.json ships (legacy style)
    "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048,
    "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
    "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0], "n_routed_experts": 256, "num_experts_per_tok": 6,
    "n_shared_experts": 1, "num_hash_layers": 3, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
    "routed_scaling_factor": 1.5, "norm_topk_prob": True, "swiglu_limit": 10.0, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "compress_rope_theta": 160000, "max_position_embeddings": 1048576,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
    "num_nextn_predict_layers": 1, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}
FLASH_OFFICIAL = {
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3, "n_mtp_layers": 1,
    "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 6,
    "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024, "head_dim": 512,
    "rope_head_dim": 64, "norm_eps": 1e-6, "o_groups": 8, "o_lora_rank": 1024, "window_size": 128,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0], "compress_rope_theta": 160000, "original_seq_len": 65536,
    "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1, "index_n_heads": 64,
    "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4",
}


def test_both_styles_give_the_flash_preset():
    assert Config.from_dict(FLASH_HF) == Config.flash()
    assert Config.from_dict(FLASH_OFFICIAL) == Config.flash()
    assert Config.from_dict({**FLASH_HF, "eos_token_id": [1, 2]}) == Config.flash()  # transformers' list form


def test_pro_schedule_starts_with_two_hca_layers():
    pro = Config.pro()
    assert pro.layer_types[:4] == [HCA, HCA, CSA, HCA] and pro.layer_types.count(CSA) == 30
    assert pro.compress_ratios[-1] == 0  # MTP layer is sliding-only
    # lessons.md: honour a checkpoint's compress_ratios (architecture.md section 2's Pro row), not a default
    ratios = [128, 128] + [4, 128] * 29 + [4] + [0]
    for style in ({"n_layers": 61, "compress_ratios": ratios},
                  {"num_hidden_layers": 61, "compress_ratios": ratios, "model_type": "deepseek_v4"}):
        got = Config.from_dict(style)
        assert got.layer_types == pro.layer_types and got.compress_ratios == ratios, style


def test_transformers_config_round_trips():
    from transformers import DeepseekV4Config

    cfg = Config.tiny()
    hf = DeepseekV4Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    assert hf.layer_types == cfg.layer_types
    assert hf.mlp_layer_types == ["hash_moe", "moe", "moe", "moe"]
    assert Config.from_dict(hf.to_dict()) == cfg


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 0), ("o_groups", 3), ("num_experts_per_tok", 99), ("scoring_func", "relu"),
    ("qk_rope_head_dim", 7), ("layer_types", [SLIDING]), ("hc_eps", -1.0), ("num_nextn_predict_layers", 2),
    ("bos_token_id", "0"), ("eos_token_id", None), ("num_hash_layers", True),
    ("beta_fast", "32"), ("original_max_position_embeddings", "512"), ("norm_topk_prob", "no"),
])
def test_invalid_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        Config.tiny(**{field: value})


@pytest.mark.parametrize("style,key,value,field", [  # key: dotted path into the JSON
    ("hf", "eos_token_id", None, "eos_token_id"), ("hf", "eos_token_id", [], "eos_token_id"),
    ("hf", "bos_token_id", "0", "bos_token_id"), ("hf", "num_hidden_layers", "4", "num_hidden_layers"),
    ("hf", "rope_scaling", "yarn", "rope_scaling"), ("hf", "rope_parameters", [1], "rope_parameters"),
    ("hf", "rope_parameters.compress", "yarn", "rope_parameters.compress"),
    ("hf", "rope_parameters.compress.factor", "x", "rope_factor"),
    ("hf", "rope_parameters.compress.beta_slow", -5, "beta_slow"),
    ("hf", "partial_rotary_factor", "x", "partial_rotary_factor"), ("hf", "mlp_layer_types", 5, "mlp_layer_types"),
    ("legacy", "rope_scaling.beta_fast", "32", "beta_fast"),
    ("legacy", "rope_scaling.original_max_position_embeddings", "512", "original_max_position_embeddings"),
    ("official", "original_seq_len", "512", "original_max_position_embeddings"),
    ("official", "beta_slow", -5, "beta_slow"), ("official", "n_layers", "4", "num_hidden_layers"),
])
def test_invalid_json_values_are_rejected_naming_the_field(style, key, value, field):
    d = copy.deepcopy({"hf": Config.tiny().to_hf_dict(), "legacy": FLASH_HF, "official": FLASH_OFFICIAL}[style])
    *outer, last = key.split(".")
    inner = d
    for k in outer:
        inner = inner[k]
    inner[last] = value
    with pytest.raises(ConfigError, match=f"'{field}'"):
        Config.from_dict(d)


def test_unknown_model_type_and_bad_ratios():
    with pytest.raises(ConfigError, match="model_type"):
        Config.from_dict({"model_type": "llama"})
    with pytest.raises(ConfigError, match="compress_ratios"):
        Config.from_dict({**FLASH_HF, "compress_ratios": [0, 4]})
    with pytest.raises(ConfigError, match="rope_scaling"):
        Config.from_dict({**FLASH_HF, "rope_scaling": {"type": "linear", "factor": 2}})


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        Config.from_file(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        Config.from_file(tmp_path / "missing.json")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ConfigError, match="dir.json: cannot read"):
        Config.from_file(tmp_path / "dir.json")
    assert dsv4.Config.from_file  # public

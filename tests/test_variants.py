"""Config variants the parity tests do not cover: checkpoints and configs that must survive the trip
through transformers (the oracle) and DeepSeek's official layout."""
from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.checkpoint import CheckpointError, build_model, save_official
from dsv4.config import CSA, HCA, ConfigError
from helpers import hf_model, random_model

SMALL = dict(num_hidden_layers=2, layer_types=[CSA, HCA])


@pytest.mark.parametrize("head_dim,rope_dim", [(44, 30), (49, 8), (64, 16)])
def test_rope_dims_survive_transformers_config(head_dim, rope_dim):
    """transformers reads qk_rope_head_dim as int(head_dim * partial_rotary_factor): 30 / 44 * 44 truncates to 29."""
    from transformers import DeepseekV4Config

    cfg = dsv4.Config.tiny(head_dim=head_dim, qk_rope_head_dim=rope_dim)
    d = cfg.to_hf_dict()
    hf = DeepseekV4Config(**{k: v for k, v in d.items() if k != "architectures"})
    assert hf.qk_rope_head_dim == rope_dim
    assert dsv4.Config.from_dict(d).qk_rope_head_dim == rope_dim


def test_odd_rope_split_checkpoint_loads_in_transformers(tmp_path):
    cfg = dsv4.Config.tiny(head_dim=44, qk_rope_head_dim=30, **SMALL)
    ours = random_model(cfg)
    dsv4.save_model(ours, tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - hf_model(tmp_path)(ids, use_cache=False).logits).abs().max().item() <= 1e-4


def test_tied_embeddings_share_one_parameter(tmp_path):
    cfg = dsv4.Config.tiny(tie_word_embeddings=True, **SMALL)
    for model in (random_model(cfg), build_model(cfg, torch.bfloat16)):
        assert model.head.weight is model.embed.weight
    ours = random_model(cfg)
    dsv4.save_model(ours, tmp_path)
    back = dsv4.load_model(tmp_path, dtype=torch.float32)
    assert back.head.weight is back.embed.weight and torch.equal(back.embed.weight, ours.embed.weight)
    ref = hf_model(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (1, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids, use_cache=False).logits).abs().max().item() <= 1e-4


def test_tied_model_trains_checkpoints_and_resumes(tmp_path):
    """A training checkpoint of a tied model (safetensors refuses one storage under two names) resumes tied."""
    import numpy as np

    from dsv4.train import TrainConfig, Trainer

    cfg, tokens = dsv4.Config.tiny(tie_word_embeddings=True, **SMALL), np.arange(4000, dtype=np.int32) % 97
    tcfg = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup=1)
    trainer = Trainer(random_model(cfg, seed=1), tokens, tcfg)
    trainer.step()
    trainer.save(tmp_path / "ckpt")
    again = Trainer(random_model(cfg, seed=2), tokens, tcfg)
    again.resume(tmp_path / "ckpt")
    assert again.model.head.weight is again.model.embed.weight
    assert torch.equal(again.model.embed.weight, trainer.model.embed.weight)
    assert again.step()["loss"] == trainer.step()["loss"]


def test_transformers_tied_checkpoint_loads(tmp_path):
    """transformers ties lm_head to the embedding and writes only model.embed_tokens.weight."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = dsv4.Config.tiny(tie_word_embeddings=True, num_nextn_predict_layers=0, **SMALL)
    torch.manual_seed(0)
    ref = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_hf_dict())).eval()
    ref.save_pretrained(tmp_path)
    ours = dsv4.load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - ref(ids, use_cache=False).logits).abs().max().item() <= 1e-4


def test_tied_config_refuses_a_different_head(tmp_path):
    dsv4.save_model(random_model(dsv4.Config.tiny(**SMALL)), tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"tie_word_embeddings": false', '"tie_word_embeddings": true'))
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        dsv4.load_model(tmp_path, dtype=torch.float32)


@pytest.mark.filterwarnings("ignore:.*no mtp")
@pytest.mark.parametrize("mtp", [1, 0])
def test_transformers_resave_of_our_checkpoint_loads(tmp_path, mtp):
    """save_model -> transformers from_pretrained -> save_pretrained writes attention leaves in a mix of
    official and transformers names (`attn.compressor.indexer.gate_proj`, `self_attn.norm`)."""
    ours = random_model(dsv4.Config.tiny(num_nextn_predict_layers=mtp, **SMALL))
    dsv4.save_model(ours, tmp_path / "ours")
    hf_model(tmp_path / "ours").save_pretrained(tmp_path / "hf")
    back = dsv4.load_model(tmp_path / "hf", dtype=torch.float32)
    theirs = back.state_dict()
    for name, t in ours.state_dict().items():
        if not name.startswith("mtp."):  # transformers drops the MTP weights
            assert torch.equal(theirs[name], t), name


@pytest.mark.parametrize("field,value", [("hca_compress_ratio", 4), ("norm_topk_prob", False),
                                         ("bos_token_id", 2), ("eos_token_id", 7)])
def test_save_official_refuses_what_its_config_cannot_say(tmp_path, field, value):
    """compress_ratios marks CSA layers by ratio 4 (an HCA ratio of 4 reloads them as CSA); the official
    router always normalises its weights; the official config has no token ids (a reload would stop on 1)."""
    model = random_model(dsv4.Config.tiny(**SMALL, **{field: value}))
    with pytest.raises(ConfigError, match=field):
        save_official(model, tmp_path, fp8=False, fp4_experts=False)
    assert not list(tmp_path.glob("*.safetensors"))

"""FP4 QAT: the fake quantisation is the official FP4 format, gradients pass straight through, and an
exported official checkpoint reproduces the QAT model's logits."""
import re

import numpy as np
import torch

import dsv4
from dsv4.quant import dequant_fp4_weight, quant_fp4_weight
from dsv4.train import TrainConfig, Trainer, enable_fp4_qat, fake_fp4
from helpers import random_model


def train(model, steps: int) -> None:
    tokens = np.tile(np.arange(2, 60), 200).astype(np.int32)
    trainer = Trainer(model, tokens, TrainConfig(steps=steps, batch_size=2, seq_len=32, warmup=1))
    for _ in range(steps):
        trainer.step()


@torch.no_grad()
def bf16_exact(model) -> None:
    """The official layout stores these in BF16: make them BF16-exact before exporting."""
    for name, p in model.named_parameters():
        if not re.search(r"experts\.w[123]$|hc_\w+_(fn|base|scale)$|attn_sink$|\.ape$", name):
            p.copy_(p.bfloat16().float())


def test_fake_fp4_is_the_official_storage_format():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fake_fp4(w), dequant_fp4_weight(*quant_fp4_weight(w)))


def test_straight_through_gradient():
    w = torch.randn(8, 32, requires_grad=True)
    g = torch.randn(8, 32)
    (fake_fp4(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_qat_training_exports_an_official_checkpoint_with_equal_logits(tmp_path):
    cfg = dsv4.Config.tiny(vocab_size=128)
    model = enable_fp4_qat(random_model(cfg, seed=3))
    train(model, 4)
    model.eval()
    bf16_exact(model)
    dsv4.save_official(model, tmp_path, fp8=False)
    loaded = dsv4.load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (loaded(ids) - model(ids)).abs().max().item() <= 1e-5
    packed = dsv4.load_model(tmp_path, dtype=torch.float32, fp4_experts=True)
    with torch.no_grad():
        assert (packed(ids) - model(ids)).abs().max().item() <= 1e-5


def test_fake_fp8_is_the_official_storage_format_with_straight_through_gradient():
    from dsv4.quant import dequant_fp8_weight, quant_fp8_weight
    from dsv4.train import fake_fp8

    w = torch.randn(200, 136, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.equal(fake_fp8(w), dequant_fp8_weight(*quant_fp8_weight(w.detach())))
    g = torch.randn(200, 136)
    (fake_fp8(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_fp4_fp8_qat_export_reproduces_the_trained_logits(tmp_path):
    cfg = dsv4.Config.tiny(vocab_size=128)
    model = enable_fp4_qat(random_model(cfg, seed=5), fp8=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert sum(type(m).__name__ == "QATLinear" for m in model.modules()) >= 5 * cfg.num_hidden_layers
    train(model, 3)
    assert set(model.state_dict()) == set(state)  # same parameters, so checkpoints are unchanged
    model.eval()
    bf16_exact(model)
    dsv4.save_official(model, tmp_path, fp8=True)
    loaded = dsv4.load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (loaded(ids) - model(ids)).abs().max().item() <= 1e-5
        # and the fake quantisation mattered: the same weights without it give other logits
        plain = dsv4.load_model(tmp_path, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        assert (plain(ids) - model(ids)).abs().max().item() > 1e-4


def test_qat_experts_stacked_weights_are_the_per_expert_fp4_values():
    """The compiled decode step reads all experts at once (`stacked`): under QAT those are the FP4 values too."""
    model = enable_fp4_qat(random_model(dsv4.Config.tiny(vocab_size=128), seed=5))
    E = model.layers[1].ffn.experts
    for i, w in enumerate(E.stacked(torch.float32)):
        want = torch.stack([E.weights(e, torch.float32)[i] for e in range(E.w1.shape[0])])
        assert torch.equal(w, want)
        assert not torch.equal(w, (E.w1, E.w2, E.w3)[i])  # quantised, not the raw weights

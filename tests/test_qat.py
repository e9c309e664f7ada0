"""FP4 QAT: the fake quantisation is the official FP4 format, gradients pass straight through, and an
exported official checkpoint reproduces the QAT model's logits."""
import re

import numpy as np
import torch

import dsv4
from dsv4.quant import dequant_fp4_weight, quant_fp4_weight
from dsv4.train import TrainConfig, Trainer, enable_fp4_qat, fake_fp4
from helpers import random_model


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
    tokens = np.tile(np.arange(2, 60), 200).astype(np.int32)
    trainer = Trainer(model, tokens, TrainConfig(steps=4, batch_size=2, seq_len=32, warmup=1))
    for _ in range(4):
        trainer.step()
    model.eval()
    with torch.no_grad():  # the official layout stores these in BF16: make them BF16-exact first
        for name, p in model.named_parameters():
            if not re.search(r"experts\.w[123]$|hc_\w+_(fn|base|scale)$|attn_sink$|\.ape$", name):
                p.copy_(p.bfloat16().float())
    dsv4.save_official(model, tmp_path, fp8=False)
    loaded = dsv4.load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (loaded(ids) - model(ids)).abs().max().item() <= 1e-5
    packed = dsv4.load_model(tmp_path, dtype=torch.float32, fp4_experts=True)
    with torch.no_grad():
        assert (packed(ids) - model(ids)).abs().max().item() <= 1e-5

"""Training: Muon + AdamW, the training loop, checkpoints and exact resume."""
from .muon import Muon, newton_schulz, param_groups
from .qat import enable_fp4_qat, fake_fp4, fake_fp8
from .trainer import TrainConfig, Trainer

__all__ = ["Muon", "newton_schulz", "param_groups", "TrainConfig", "Trainer", "enable_fp4_qat", "fake_fp4",
           "fake_fp8"]

"""Training: Muon + AdamW, the training loop, checkpoints and exact resume."""
from .muon import Muon, newton_schulz, param_groups
from .trainer import TrainConfig, Trainer

__all__ = ["Muon", "newton_schulz", "param_groups", "TrainConfig", "Trainer"]

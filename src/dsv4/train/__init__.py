"""Training: Muon + AdamW optimisation (more of the stack lands with issue 5)."""
from .muon import Muon, newton_schulz, param_groups

__all__ = ["Muon", "newton_schulz", "param_groups"]

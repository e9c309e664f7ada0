"""dsv4: DeepSeek-V4 in PyTorch.

Public API: `load_model`, `save_model`, `Config`, `Transformer`."""
from .checkpoint import CheckpointError, load_model, save_model, save_official
from .config import Config, ConfigError
from .model.transformer import Transformer

__all__ = ["load_model", "save_model", "save_official", "Config", "ConfigError", "CheckpointError", "Transformer"]
__version__ = "0.1.0"

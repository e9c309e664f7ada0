"""dsv4: DeepSeek-V4 in PyTorch.

Public API: `load_model`, `save_model`, `Config`, `Transformer`, `LLM`, `SamplingParams`."""
from .checkpoint import CheckpointError, load_model, save_model, save_official
from .config import Config, ConfigError
from .engine import LLM, EngineConfig, RequestError, SamplingParams
from .model.transformer import Transformer

__all__ = ["load_model", "save_model", "save_official", "Config", "ConfigError", "CheckpointError", "Transformer",
           "LLM", "SamplingParams", "EngineConfig", "RequestError"]
__version__ = "0.1.0"

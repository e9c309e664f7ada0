"""Inference engine: decode state, continuous batching, prefix cache, sampling."""
from .engine import LLM, EngineConfig, LLMEngine
from .sampling import RequestError, SamplingParams
from .sequence import RequestOutput

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestError", "RequestOutput"]

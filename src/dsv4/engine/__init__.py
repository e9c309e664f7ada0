"""Inference engine: decode state, continuous batching, prefix cache, sampling."""
from .async_engine import AsyncLLM
from .engine import LLM, EngineConfig, LLMEngine
from .sampling import RequestError, SamplingParams
from .sequence import RequestOutput

__all__ = ["LLM", "LLMEngine", "AsyncLLM", "EngineConfig", "SamplingParams", "RequestError", "RequestOutput"]

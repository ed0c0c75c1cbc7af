"""The inference engine: paged KV cache, prefix-caching block manager, continuous-batching scheduler,
sampler, and the ``LLMEngine`` / ``LLM`` API."""

from ernie45.engine.llm import LLM, CompletionOutput, LLMEngine, QueueFullError, RequestOutput
from ernie45.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "LLMEngine", "QueueFullError", "RequestOutput", "SamplingParams"]

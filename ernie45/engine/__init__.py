"""The inference engine: paged KV cache, prefix-caching block manager, continuous-batching scheduler,
sampler, and the ``LLMEngine`` / ``LLM`` API."""

from ernie45.engine.errors import QueueFullError, RequestError
from ernie45.engine.llm import LLM, LLMEngine
from ernie45.engine.output import CompletionOutput, RequestOutput
from ernie45.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "LLMEngine", "QueueFullError", "RequestError", "RequestOutput", "SamplingParams"]

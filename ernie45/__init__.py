"""ernie45: ERNIE 4.5 text models in plain PyTorch."""

from ernie45.config import ConfigError, ModelConfig
from ernie45.loading import load_model, save_model
from ernie45.model.checkpoint import CheckpointError
from ernie45.model.model import ErnieForCausalLM, init_weights

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "ErnieForCausalLM", "ModelConfig", "init_weights", "load_model",
    "save_model", "__version__",
]


def __getattr__(name: str):  # lazy: the engine pulls in more than a parity test needs
    if name in ("LLM", "SamplingParams", "LLMEngine"):
        from ernie45.engine import llm, sampling_params

        return getattr(llm, name, None) or getattr(sampling_params, name)
    raise AttributeError(f"module 'ernie45' has no attribute {name!r}")

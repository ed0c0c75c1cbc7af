"""OpenAI-compatible HTTP server over one LLMEngine: `ernie45 serve MODEL`."""

from ernie45.serve.app import ServerThread, build_app, build_engine, serve

__all__ = ["ServerThread", "build_app", "build_engine", "serve"]

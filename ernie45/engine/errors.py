"""The errors the engine raises for a request it refuses; a server maps them onto HTTP statuses."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that cannot run as given. ``param`` names the field at fault (``prompt``, ``max_tokens``,
    a ``SamplingParams`` field), ``code`` is a machine-readable reason (``context_length_exceeded``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class QueueFullError(RuntimeError):
    """``max_waiting`` requests are already queued; retry later (HTTP 429)."""

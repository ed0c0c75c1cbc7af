"""Shared fixtures: tiny checkpoints written by transformers' save_pretrained (the reference)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if not torch.cuda.is_available():
    # The Triton kernels run on CPU under Triton's interpreter; triton reads this when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")


@pytest.fixture(scope="session")
def artifacts_dir() -> str:
    """Where tests leave files people may want to look at (screenshots, plots)."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS

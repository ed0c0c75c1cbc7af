"""The training fixtures (test tokenizer, small corpus) for the multi-rank trainer test."""

from tests.train.conftest import small_corpus, tok, tok_dir  # noqa: F401 - pytest fixtures

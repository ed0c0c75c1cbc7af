"""Server test fixtures: a tiny real checkpoint (random MoE weights + a SentencePiece tokenizer trained
here) served by the REAL app (uvicorn on a free loopback port, the real LLMEngine behind it)."""

from __future__ import annotations

import os

import pytest
import sentencepiece as spm
import torch

import ernie45
from ernie45.config import ModelConfig
from tests.serve.util import MAX_MODEL_LEN, SERVED_NAME, engine_kwargs, write_tokenizer


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """config.json + model.safetensors + tokenizer files; weights large enough that greedy picks are clear."""
    folder = str(tmp_path_factory.mktemp("tiny_ckpt"))
    write_tokenizer(folder)
    vocab = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model")).get_piece_size()
    config = ModelConfig.from_name("tiny-moe").replace(vocab_size=vocab, max_position_embeddings=MAX_MODEL_LEN)
    torch.manual_seed(0)
    model = ernie45.ErnieForCausalLM(config)
    # std 0.2 (not 0.02): peaked logits, so argmax never hinges on float rounding across batch shapes
    ernie45.init_weights(model, std=0.2, seed=0)
    ernie45.save_model(model, folder)
    return folder


@pytest.fixture(scope="session")
def server(tiny_checkpoint):
    """One running server for the session's functional tests (real uvicorn, real engine thread)."""
    from ernie45.serve import ServerThread, build_app, build_engine

    engine = build_engine(tiny_checkpoint, **engine_kwargs())
    with ServerThread(build_app(engine, SERVED_NAME, max_body_bytes=64 * 1024)) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint):
    from ernie45.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def scripted_server(tmp_path_factory):
    """A server whose model writes a script (tests/serve/scripted.py) behind a Thinking-style template:
    yields (server, model, tokenizer); set model.prompt_len and model.script before each request."""
    from ernie45.engine.llm import LLMEngine
    from ernie45.serve import ServerThread, build_app
    from tests.serve.scripted import SCRIPTED_LEN, build_scripted

    model, tok = build_scripted(str(tmp_path_factory.mktemp("thinking")))
    kw = engine_kwargs(enable_prefix_caching=False, max_model_len=SCRIPTED_LEN, kv_cache_memory="64MB")
    kw.pop("dtype")
    with ServerThread(build_app(LLMEngine(model, tokenizer=tok, **kw), "scripted-thinking")) as srv:
        yield srv, model, tok

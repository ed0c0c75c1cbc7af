"""Helpers for the server tests: the tiny checkpoint's tokenizer, shared constants, metrics polling."""

from __future__ import annotations

import json
import os
import random

import sentencepiece as spm

SERVED_NAME = "tiny-ernie"
MAX_MODEL_LEN = 256
SPECIALS = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>", "<mask:4>", "<mask:5>", "<mask:6>",
            "<mask:7>"]
WORDS = ("the a model token text engine quick brown fox jumps over lazy dog cache memory expert layer attention "
         "streaming server request answer question hello world python code tensor batch").split()


def write_tokenizer(folder: str, vocab_size: int = 400) -> None:
    """A byte-fallback BPE SentencePiece model with ERNIE's special tokens and tokenizer_config.json."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(300)]
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(folder, "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, user_defined_symbols=SPECIALS, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2)
    os.remove(corpus)
    os.remove(os.path.join(folder, "tokenizer.vocab"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
              "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>", "mask_token": "<mask:1>",
              "add_bos_token": False, "model_max_length": MAX_MODEL_LEN}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def engine_kwargs(**over) -> dict:
    kw = dict(dtype="float32", max_num_seqs=64, kv_cache_memory="32MB", max_model_len=MAX_MODEL_LEN,
              max_waiting=512)
    kw.update(over)
    return kw


def read_metrics(url: str) -> dict[str, float]:
    import httpx

    from ernie45.serve.metrics import parse_metrics

    r = httpx.get(url + "/metrics", timeout=10)
    r.raise_for_status()
    return parse_metrics(r.text)


def wait_idle(url: str, timeout: float = 20.0) -> dict[str, float]:
    """Poll /metrics until the engine holds no request and no KV block; return the last reading."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics(url)
        idle = (m["ernie45:num_requests_running"], m["ernie45:num_requests_waiting"],
                m["ernie45:kv_cache_blocks_used"]) == (0, 0, 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)

"""Fixtures for training tests: a small tokenizer trained on the repo corpus, tiny recipes."""

from __future__ import annotations

import json
import os

import pytest

from ernie45.tokenizer import Tokenizer
from ernie45.train.data import read_texts
from ernie45.train.spm import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS_EN = os.path.join(ROOT, "data", "corpus", "en_fortunes.jsonl")
CORPUS_ZH = os.path.join(ROOT, "data", "corpus", "zh_poems.jsonl")
SFT_DEMO = os.path.join(ROOT, "data", "sft_demo.jsonl")
DPO_DEMO = os.path.join(ROOT, "data", "dpo_demo.jsonl")


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> str:
    """A 1024-piece tokenizer with the demo's conventions, trained on a slice of the repo corpus."""
    out = str(tmp_path_factory.mktemp("tok"))
    texts = read_texts(CORPUS_EN)[:800] + read_texts(CORPUS_ZH)[:20]
    return train_tokenizer(texts, out, vocab_size=1024, character_coverage=0.98)


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> str:
    """~60 KB of the repo corpus (English and Chinese) as one pretraining file."""
    path = str(tmp_path_factory.mktemp("corpus") / "small.jsonl")
    texts = read_texts(CORPUS_EN)[:200] + read_texts(CORPUS_ZH)[:40]
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return path


def tiny_model(vocab: int = 1024, **kw) -> dict:
    """Recipe 'model' entry: the tiny-moe preset with the test tokenizer's vocabulary."""
    return {"preset": "tiny-moe", "vocab_size": vocab, **kw}

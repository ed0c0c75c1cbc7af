"""A served model whose output is a script: the real engine, KV cache and sampler run, but the logits of
each sampled row are replaced so that greedy decoding writes the given token ids (then </s>).

Used to test the parsers (reasoning, tool calls) on exactly the text a Thinking model writes, whatever the
random weights would say. The tokenizer is a tiny SentencePiece model with ERNIE-Thinking's ChatML tokens:
`<|im_start|>`, `<|im_end|>`, `<think>`, `</think>` are special (hidden by the detokenizer by default),
`<response>` and `<tool_call>` are plain text that takes several tokens, so they straddle stream chunks.
"""

from __future__ import annotations

import json
import os

import sentencepiece as spm
import torch

import ernie45
from ernie45.config import ModelConfig
from ernie45.model.model import ErnieForCausalLM
from tests.serve.util import MAX_MODEL_LEN, SPECIALS, WORDS

SCRIPTED_LEN = 1024
THINKING_SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "ernie45_thinking_template.jinja")


def write_thinking_tokenizer(folder: str, vocab_size: int = 500) -> None:
    import random

    rng = random.Random(1)
    words = WORDS + ("think response tool call name arguments city Paris weather get now answer is "
                     "{ } [ ] : , \" step").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(400)]
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(folder, "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, user_defined_symbols=SPECIALS + THINKING_SPECIALS, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        minloglevel=2)
    os.remove(corpus)
    os.remove(os.path.join(folder, "tokenizer.vocab"))
    with open(TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
              "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>", "mask_token": "<mask:1>",
              "additional_special_tokens": THINKING_SPECIALS, "add_bos_token": False,
              "model_max_length": MAX_MODEL_LEN, "chat_template": template}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


class ScriptedModel(ErnieForCausalLM):
    """`prompt_len` and `script` are set by the test before each request (requests run one at a time)."""

    prompt_len = 0
    script: list[int] = []
    eos = 2

    def forward(self, input_ids, position_ids=None, cache=None, logits_indices=None, compute_logits=True,
                **kw):  # noqa: ANN001, ANN201
        out = super().forward(input_ids, position_ids=position_ids, cache=cache, logits_indices=logits_indices,
                              compute_logits=compute_logits, **kw)
        if out.logits is None or cache is None or logits_indices is None:
            return out
        pos = position_ids.reshape(-1)[logits_indices].tolist()
        logits = torch.full_like(out.logits, -30.0)
        for r, p in enumerate(pos):
            k = p + 1 - self.prompt_len  # index of the token this row predicts in the output
            logits[r, self.script[k] if 0 <= k < len(self.script) else self.eos] = 30.0
        out.logits = logits
        return out


def build_scripted(folder: str) -> tuple[ScriptedModel, ernie45.tokenizer.Tokenizer]:
    from ernie45.tokenizer import Tokenizer

    write_thinking_tokenizer(folder)
    tok = Tokenizer.from_pretrained(folder)
    config = ModelConfig.from_name("tiny-moe").replace(vocab_size=tok.vocab_size, max_position_embeddings=SCRIPTED_LEN)
    torch.manual_seed(0)
    model = ScriptedModel(config)
    ernie45.init_weights(model, std=0.02, seed=0)
    return model.float().eval(), tok

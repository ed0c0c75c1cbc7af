"""Train a SentencePiece tokenizer in ERNIE 4.5's conventions (spec §4) and write it in HF layout.

The ids match the official vocabulary where it matters: ``<unk>`` 0 (also pad), ``<s>`` 1, ``</s>`` 2,
then the chat and mask tokens as user-defined symbols (always cut out of raw text as one piece, so the
rendered chat template encodes ``<|end_of_sentence|>`` as a single id). Byte fallback means no text is
ever ``<unk>``. Whitespace and newlines are kept as they are (identity normalisation, no dummy prefix),
so encoding a prompt and then its reply separately gives the same text the chat template renders.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable

from ernie45.utils import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

OFFICIAL_TOKENIZER_CONFIG = "/work/shared/official/ernie-4.5-0.3b-base/tokenizer_config.json"

# The official template (tokenizer_config.json of baidu/ERNIE-4.5-0.3B-Base, spec §4), copied verbatim so
# the demo renders chats exactly as the released models do even where that file is not at hand.
CHAT_TEMPLATE = (
    '{%- if not add_generation_prompt is defined -%}\n    {%- set add_generation_prompt = true -%}\n'
    '{%- endif -%}\n{%- if not cls_token is defined -%}\n    {%- set cls_token = "<|begin_of_sentence|>" -%}\n'
    '{%- endif -%}\n{%- if not sep_token is defined -%}\n    {%- set sep_token = "<|end_of_sentence|>" -%}\n'
    '{%- endif -%}\n{{- cls_token -}}\n{%- for message in messages -%}\n    {%- if message["role"] == "user" -%}\n'
    '        {{- "User: " + message["content"] + "\n" -}}\n    {%- elif message["role"] == "assistant" -%}\n'
    '        {{- "Assistant: " + message["content"] + sep_token -}}\n    {%- elif message["role"] == "system" -%}\n'
    '        {{- message["content"] + "\n" -}}\n    {%- endif -%}\n{%- endfor -%}\n'
    '{%- if add_generation_prompt -%}\n    {{- "Assistant: " -}}\n{%- endif -%}'
)

SPECIAL_TOKENS = {
    "cls_token": "<|begin_of_sentence|>",
    "sep_token": "<|end_of_sentence|>",
    "mask_token": "<mask:1>",
    "sys_start_token": "<mask:4>",
    "sys_end_token": "<mask:5>",
    "header_start_token": "<mask:6>",
    "header_end_token": "<mask:7>",
}


def official_chat_template() -> str:
    """The chat template of the official checkpoint when its file is present, else our verbatim copy."""
    if os.path.isfile(OFFICIAL_TOKENIZER_CONFIG):
        with open(OFFICIAL_TOKENIZER_CONFIG, encoding="utf-8") as f:
            return json.load(f)["chat_template"]
    return CHAT_TEMPLATE


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 6144, model_max_length: int = 4096,
                    seed_sentencepiece_size: int = 200_000, character_coverage: float = 0.9995) -> str:
    """Train a byte-fallback BPE SentencePiece model on ``texts`` and write ``tokenizer.model``,
    ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``. Returns ``out_dir``."""
    import sentencepiece as spm

    sentences = [t for text in texts for t in text.split("\n") if t.strip()]
    if not sentences:
        raise ValueError("train_tokenizer: the corpus is empty; give at least one non-blank text")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=character_coverage, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        user_defined_symbols=list(SPECIAL_TOKENS.values()), input_sentence_size=seed_sentencepiece_size,
        shuffle_input_sentence=False, num_threads=1, minloglevel=2,
        max_sentencepiece_length=16, allow_whitespace_only_pieces=True,
    )
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, "tokenizer.model"), buf.getvalue())
    proc = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
                   **SPECIAL_TOKENS}
    added = {}
    for tok in ["<unk>", "<s>", "</s>", *SPECIAL_TOKENS.values()]:
        added[str(proc.piece_to_id(tok))] = {"content": tok, "lstrip": False, "normalized": False,
                                             "rstrip": False, "single_word": False, "special": True}
    config = {
        **special_map,
        "added_tokens_decoder": added,
        "additional_special_tokens": None,
        "tokenizer_class": "LlamaTokenizer",  # how transformers serves ERNIE's tokenizer (spec §4)
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": official_chat_template(),
    }
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2,
                                                                                 ensure_ascii=False) + "\n")
    atomic_write_text(os.path.join(out_dir, "special_tokens_map.json"), json.dumps(special_map, indent=2) + "\n")
    log.info("tokenizer: %d pieces written to %s", proc.get_piece_size(), out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m ernie45.train.spm OUT_DIR FILE.jsonl ...``: train the demo tokenizer on text records."""
    import argparse

    from ernie45.train.data import read_texts

    p = argparse.ArgumentParser(prog="python -m ernie45.train.spm", description=main.__doc__)
    p.add_argument("out_dir")
    p.add_argument("files", nargs="+", help="pretraining files (.jsonl with 'text', or .txt)")
    p.add_argument("--vocab-size", type=int, default=6144)
    p.add_argument("--model-max-length", type=int, default=4096)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    texts = [t for f in args.files for t in read_texts(f)]
    train_tokenizer(texts, args.out_dir, args.vocab_size, args.model_max_length)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tokenizer: special tokens from the official files, round trips, streaming decode, chat template.

The real ERNIE `tokenizer.model` is not available here, so each test folder holds a small byte-fallback
BPE SentencePiece model trained at test time on generated English and Chinese text, next to the official
`tokenizer_config.json`, `special_tokens_map.json` and an adapted `added_tokens.json`.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil

import pytest
import sentencepiece as spm

from ernie45.tokenizer import Tokenizer, TokenizerError, load_tokenizer

OFFICIAL = "/work/shared/official/ernie-4.5-0.3b-base"
if not os.path.isdir(OFFICIAL):  # a copy travels with the repo's shared/ folder on other machines
    OFFICIAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "shared", "official", "ernie-4.5-0.3b-base")
OFFICIAL_FIRST_ADDED_ID = 100295  # <|IMAGE_PLACEHOLDER|>, the first id in the official added_tokens.json

EN_WORDS = ("the a model token text engine quick brown fox jumps over lazy dog cache memory expert layer "
            "attention streaming server request answer question hello world python code tensor batch").split()
ZH_CHARS = ("我们的模型可以生成中文文本并且支持流式输出今天天气很好"
            "你好世界学习语言数据训练专家注意力缓存服务器请求回答问题")

# Characters the training text never contains: they must go through byte-fallback pieces (<0xE9> ...).
RARE = "龘 𠀀 😀 é"
TEXTS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "我们的模型可以生成中文文本。今天天气很好！",
    "Mixed 中文 and English: 你好世界 hello world",
    f"Rare characters {RARE} and emoji 🎉🎉 in 龘龘龘 a row",
    "  leading spaces, double  spaces and a trailing newline\n",
    "tabs\tand\nnewlines\n\nand digits 12345",
]


# Reserved pieces of type CONTROL, as a real vocabulary has: never produced from text by SentencePiece,
# skipped on decode, and (unlike the named special tokens) not split out of text.
CONTROL = ["<mask:0>", "<mask:2>"]


def training_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 2 == 0:
            words = " ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(4, 12)))
            lines.append(words.capitalize() + rng.choice(".!?"))
        else:
            lines.append("".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(6, 20))) + rng.choice("。！？"))
    return lines


def write_test_tokenizer(folder: str, add_dummy_prefix: bool = False, vocab_size: int = 700) -> str:
    """Train a small SentencePiece model into `folder` with the official ERNIE tokenizer JSON files.

    The named special tokens (cls/sep/mask/sys/header) are user-defined pieces right after <unk> <s> </s>,
    as in the real vocabulary, where they are SentencePiece pieces, not added tokens. The official
    added_tokens.json numbers its 1009 tokens 100295..101303, just past the real SentencePiece vocabulary;
    here they keep their order but start right after our small vocabulary (id - 100295 + vocab_size),
    so every id points into this tokenizer.
    """
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(OFFICIAL, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    specials = [config[k] for k in ("cls_token", "sep_token", "mask_token", "sys_start_token", "sys_end_token",
                                    "header_start_token", "header_end_token")]
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(training_corpus()))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(folder, "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.9995, user_defined_symbols=specials,
        control_symbols=CONTROL,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=False, minloglevel=2)
    os.remove(corpus)
    os.remove(os.path.join(folder, "tokenizer.vocab"))
    with open(os.path.join(OFFICIAL, "added_tokens.json"), encoding="utf-8") as f:
        added = {tok: tid - OFFICIAL_FIRST_ADDED_ID + vocab_size for tok, tid in json.load(f).items()}
    with open(os.path.join(folder, "added_tokens.json"), "w", encoding="utf-8") as f:
        json.dump(added, f)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(OFFICIAL, name), folder)
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    return write_test_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def tok_prefix(tmp_path_factory) -> Tokenizer:
    """A model with SentencePiece's add_dummy_prefix on: '▁' in front of every text segment."""
    return Tokenizer.from_pretrained(write_test_tokenizer(str(tmp_path_factory.mktemp("tokp")), True))


# ------------------------------------------------------------------------------------ special tokens
def test_special_tokens_and_ids_come_from_the_files(tok):
    sp = tok.sp
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.cls_token == "<|begin_of_sentence|>" and tok.cls_token_id == sp.piece_to_id("<|begin_of_sentence|>")
    assert tok.sep_token == "<|end_of_sentence|>" and tok.sep_token_id == sp.piece_to_id("<|end_of_sentence|>")
    assert tok.mask_token == "<mask:1>" and tok.mask_token_id == sp.piece_to_id("<mask:1>")
    assert tok.stop_token_ids == [2, tok.sep_token_id]
    assert tok.vocab_size == len(tok) == 700 + 1009
    assert tok.token_to_id("<|IMAGE_PLACEHOLDER|>") == 700 and tok.token_to_id("<|IMAGE_SEP|>") == 700 + 1008
    assert not tok.add_dummy_prefix and tok.add_bos_token is False
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # add_bos_token=False (spec §4)


def test_added_and_special_tokens_are_split_before_sentencepiece(tok):
    loc5 = tok.token_to_id("<|LOC_5|>")
    ids = tok.encode("a<|end_of_sentence|>b<|LOC_5|><mask:4>c")
    assert ids == [*tok.sp.encode("a"), tok.sep_token_id, *tok.sp.encode("b"), loc5,
                   tok.token_to_id("<mask:4>"), *tok.sp.encode("c")]
    assert tok.decode(ids, skip_special_tokens=False) == "a<|end_of_sentence|>b<|LOC_5|><mask:4>c"
    assert tok.decode(ids) == "abc"
    # a control piece that is not a named special token stays text (as in Baidu's tokenizer and HF)...
    assert tok.encode("x<mask:2>y") == tok.sp.encode("x<mask:2>y")
    assert tok.sp.piece_to_id("<mask:2>") not in tok.encode("x<mask:2>y")
    # ...but its id is special when decoding
    ids = [*tok.sp.encode("x"), tok.sp.piece_to_id("<mask:2>"), *tok.sp.encode("y")]
    assert tok.decode(ids) == "xy" and tok.decode(ids, skip_special_tokens=False) == "x<mask:2>y"
    # '<|LOC_50|>' must not be read as '<|LOC_5|>' followed by text
    assert tok.encode("<|LOC_50|>") == [tok.token_to_id("<|LOC_50|>")]


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, tok_prefix, text):
    for t in (tok, tok_prefix):
        ids = t.encode(text)
        assert ids == t.sp.encode(text)  # no special tokens in the text: plain SentencePiece
        assert t.decode(ids) == text
        assert t.decode(ids) == t.sp.decode(ids)


def test_rare_characters_use_byte_fallback(tok):
    ids = tok.encode("龘😀")
    assert all(tok.sp.is_byte(i) for i in ids) and len(ids) == 3 + 4  # UTF-8 lengths of 龘 and 😀
    assert tok.decode(ids) == "龘😀"
    assert tok.decode(ids[:2]) == "\ufffd"  # half a character is not text
    assert tok.decode([ids[0], *tok.encode("a")]) == "\ufffda"


def test_numpy_and_torch_ids(tok):
    import numpy as np
    import torch
    ids = tok.encode("你好<|end_of_sentence|>")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode(ids) == "你好"
    det = tok.detokenizer(torch.tensor(ids[:2]))
    assert det.step(torch.tensor(ids[2:])) == tok.decode(ids[2:])


def test_ids_past_the_tokenizer_decode_to_nothing(tok):
    # the model's embedding is padded past the tokenizer (103424 rows > 101304 ids in the real model)
    assert tok.decode([*tok.encode("ok"), tok.vocab_size + 5]) == "ok"
    with pytest.raises(ValueError, match="-3"):
        tok.decode([-3])


# ------------------------------------------------------------------------------------------ streaming
def _check_stream(t: Tokenizer, ids: list[int], prompt: list[int] | None = None, chunk: int = 1) -> str:
    det = t.detokenizer(prompt)
    base = t.decode(prompt or [])
    pieces = []
    for k in range(chunk, len(ids) + chunk, chunk):
        pieces.append(det.step(ids[k - chunk:k]))
        full = t.decode((prompt or []) + ids[:k])[len(base):]
        assert "\ufffd" not in det.text, (k, det.text)
        # equal to the full decode, except a trailing half character that the full decode shows as U+FFFD
        assert full.startswith(det.text) and set(full[len(det.text):]) <= {"\ufffd"}, (k, det.text, full)
        assert len(full) - len(det.text) <= 3
    assert "".join(pieces) == det.text
    return det.text


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_equals_full_decode(tok, tok_prefix, text):
    for t in (tok, tok_prefix):
        ids = t.encode(text)
        for chunk in (1, 3):
            assert _check_stream(t, ids, chunk=chunk) == text


def test_incremental_decode_random_ids(tok, tok_prefix):
    """Random ids, half of them byte pieces: broken UTF-8 everywhere, and still equal to the full decode."""
    rng = random.Random(0)
    for t in (tok, tok_prefix):
        byte_ids = [i for i in range(t.sp.get_piece_size()) if t.sp.is_byte(i)]
        lead = [i for i in byte_ids if int(t.sp.id_to_piece(i)[3:-1], 16) >= 0xC2]  # starts of multi-byte chars
        for _ in range(100):
            ids = [rng.choice(lead) if rng.random() < 0.25 else rng.choice(byte_ids) if rng.random() < 0.5
                   else rng.randrange(t.vocab_size) for _ in range(30)]
            det = t.detokenizer()
            for k in range(1, len(ids) + 1):
                det.step(ids[k - 1:k])
                full = t.decode(ids[:k])
                assert full.startswith(det.text) and set(full[len(det.text):]) <= {"\ufffd"}, (ids[:k], det.text)
            det.finish()
            assert det.text == t.decode(ids)


def test_incremental_decode_after_a_prompt(tok, tok_prefix):
    for t in (tok, tok_prefix):
        # with a dummy prefix, SentencePiece itself puts the '▁' in front of "world"
        prompt, gen = t.encode("User: 你好"), t.encode(("" if t.add_dummy_prefix else " ") + "world 龘 again")
        # text after the prompt keeps its leading space, also with a dummy-prefix model
        assert _check_stream(t, gen, prompt) == t.decode(prompt + gen)[len(t.decode(prompt)):]
        assert _check_stream(t, gen, prompt).startswith(" world")
    # the dummy prefix is dropped at the start of a text only, also when the first step is a skipped special
    det = tok_prefix.detokenizer()
    assert det.step([tok_prefix.cls_token_id]) == ""
    assert det.step(tok_prefix.sp.encode("hello")) == "hello"


def test_incremental_decode_special_tokens_and_broken_bytes(tok):
    ids = tok.encode("答案<|end_of_sentence|>")
    det = tok.detokenizer()
    assert "".join(det.step([i]) for i in ids) == "答案"
    det = tok.detokenizer(skip_special_tokens=False)
    assert "".join(det.step([i]) for i in ids) == "答案<|end_of_sentence|>"
    # a lone lead byte followed by plain text is invalid UTF-8: U+FFFD, as in the full decode
    broken = [tok.encode("龘")[0], *tok.encode("a"), *tok.encode("b")]
    det = tok.detokenizer()
    assert [det.step([i]) for i in broken] == ["", "\ufffda", "b"]
    assert det.text == tok.decode(broken) == "\ufffdab"
    # an unfinished character at the end is flushed by finish()
    det = tok.detokenizer()
    det.step(tok.encode("龘")[:2])
    assert det.text == "" and det.finish() == "\ufffd"


# ------------------------------------------------------------------------------------- chat template
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
     {"role": "user", "content": "讲个笑话\n两行"}, {"role": "assistant", "content": "好的。"}],
    [{"role": "user", "content": ""}],
]


def _official_render(messages: list[dict], add_generation_prompt: bool, specials: dict) -> str:
    """Render with the official template the way transformers does (sandboxed jinja2, trim/lstrip blocks)."""
    import jinja2.sandbox as jinja2_sandbox
    with open(os.path.join(OFFICIAL, "tokenizer_config.json"), encoding="utf-8") as f:
        template = json.load(f)["chat_template"]
    env = jinja2_sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **specials)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_official_jinja(tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == _official_render(messages, add_generation_prompt, tok.special_tokens)
    assert ours.startswith("<|begin_of_sentence|>")
    assert ours.endswith("Assistant: ") == add_generation_prompt
    ids = tok.encode_chat(messages, add_generation_prompt)
    assert ids[0] == tok.cls_token_id and tok.decode(ids, skip_special_tokens=False) == ours


def test_chat_template_spec_example(tok):
    msgs = CONVERSATIONS[2]
    assert tok.apply_chat_template(msgs) == ("<|begin_of_sentence|>You are helpful.\nUser: Hi\nAssistant: Hello!"
                                             "<|end_of_sentence|>User: How are you?\nAssistant: ")
    # OpenAI-style text parts render like a plain string
    parts = [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize("messages, match", [
    ([{"role": "tool", "content": "x"}], r"messages\[0\]\.role='tool'.*system, user, assistant"),
    ([{"role": "user"}], r"messages\[0\] \(user\) has no text 'content'"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\]\.role=None"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "only .*text"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hello"], r"messages\[0\] must be a dict"),
])
def test_chat_template_errors(tok, messages, match):
    builtin = copy.copy(tok)
    builtin.chat_template = None  # the built-in base template checks roles and contents itself
    with pytest.raises(ValueError, match=match):
        builtin.apply_chat_template(messages)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] must be a dict with a string 'role'"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "only .*text"),
    ([{"role": "user"}], "the chat template failed"),  # the official template reads message["content"]
])
def test_checkpoint_template_errors(tok, messages, match):
    assert tok.chat_template is not None, "the official tokenizer_config.json carries its template"
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


# ------------------------------------------------------------------------------------------- errors
def test_clear_errors_for_bad_folders(tmp_path, tok_dir):
    with pytest.raises(TokenizerError, match="no such file or folder"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        Tokenizer.from_pretrained(empty)
    assert load_tokenizer(empty) is None

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tok_dir, corrupt)
    data = (corrupt / "tokenizer.model").read_bytes()
    (corrupt / "tokenizer.model").write_bytes(data[: len(data) // 3])
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        Tokenizer.from_pretrained(corrupt)

    bad_json = tmp_path / "badjson"
    shutil.copytree(tok_dir, bad_json)
    (bad_json / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(bad_json)
    with pytest.raises(ValueError, match="must be a str"):
        Tokenizer.from_pretrained(tok_dir).encode(["a"])


def test_folder_with_only_tokenizer_model(tmp_path, tok_dir):
    # no JSON files: bos/eos/unk come from the SentencePiece model, cls/sep from the template's defaults
    shutil.copy(os.path.join(tok_dir, "tokenizer.model"), tmp_path)
    t = load_tokenizer(str(tmp_path))
    assert (t.bos_token_id, t.eos_token_id, t.unk_token_id) == (1, 2, 0)
    assert t.cls_token_id == t.sp.piece_to_id("<|begin_of_sentence|>") and t.stop_token_ids == [2, t.sep_token_id]
    assert t.vocab_size == 700


# ------------------------------------------------------------------------------- transformers parity
def test_matches_transformers_llama_tokenizer(tok_dir, tok):
    import transformers
    # how transformers serves ERNIE's tokenizer (spec §4)
    hf = transformers.LlamaTokenizer.from_pretrained(tok_dir, legacy=True, add_bos_token=False,
                                                     add_prefix_space=False)
    texts = [*TEXTS, "a<|end_of_sentence|>b<|LOC_5|><mask:4>c", "x<mask:2>y<s>z</s>",
             tok.apply_chat_template(CONVERSATIONS[3])]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    for text in TEXTS:
        ids = tok.encode(text + "<|end_of_sentence|>")
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)

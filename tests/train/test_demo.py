"""The bundled demo model: present, small, ERNIE-shaped, its tokenizer in HF conventions, loads in
transformers with our logits."""

from __future__ import annotations

import json
import os

import torch

from ernie45 import load_model
from ernie45.assets import demo_path
from ernie45.tokenizer import Tokenizer
from ernie45.train.spm import CHAT_TEMPLATE, OFFICIAL_TOKENIZER_CONFIG


def test_demo_files_and_tokenizer():
    path = demo_path()
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size < 20e6
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["architectures"] == ["Ernie4_5_MoeForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert cfg["moe_layer_start_index"] == 1 and cfg["moe_num_experts"] == 8 and cfg["moe_k"] == 2
    tok = Tokenizer.from_pretrained(path)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.vocab_size <= cfg["vocab_size"]
    assert tok.cls_token == "<|begin_of_sentence|>" and tok.sep_token == "<|end_of_sentence|>"
    assert tok.stop_token_ids == [2, tok.sep_token_id]
    tc = json.load(open(os.path.join(path, "tokenizer_config.json")))
    if os.path.isfile(OFFICIAL_TOKENIZER_CONFIG):
        assert tc["chat_template"] == json.load(open(OFFICIAL_TOKENIZER_CONFIG))["chat_template"]
    assert tc["chat_template"] == CHAT_TEMPLATE
    text = "Hello, 床前明月光 ✓\n"
    assert tok.decode(tok.encode(text)) == text  # byte fallback: nothing is <unk>
    assert tok.encode("<|end_of_sentence|>") == [tok.sep_token_id]


def test_demo_loads_in_transformers_with_our_logits():
    import transformers
    ours = load_model("demo", dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(demo_path(), dtype=torch.float32).eval()
    ids = torch.tensor([Tokenizer.from_pretrained(demo_path()).encode_chat([{"role": "user", "content": "Hi"}])])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)

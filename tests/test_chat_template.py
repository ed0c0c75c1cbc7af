"""Golden tests: our rendering of a checkpoint's chat template equals transformers' `apply_chat_template`
(the official 0.3B template, and a Thinking-style template with system, tool and multi-turn messages)."""

from __future__ import annotations

import copy
import os

import pytest

from ernie45.chat_template import ChatTemplateError, render_chat_template
from ernie45.tokenizer import Tokenizer
from tests.test_tokenizer import write_test_tokenizer

transformers = pytest.importorskip("transformers")

THINKING = open(os.path.join(os.path.dirname(__file__), "data", "ernie45_thinking_template.jinja"),
                encoding="utf-8").read()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
PLAIN = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "你好，讲个笑话"}],
]
WITH_TOOLS = [
    [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris and the time?"},
     {"role": "assistant", "content": None, "reasoning_content": "Two calls are needed.",
      "tool_calls": [{"id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                     {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": {}}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
     {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
     {"role": "assistant", "content": "21 degrees at noon.", "reasoning_content": "Combine both."},
     {"role": "user", "content": "Thanks"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    return write_test_tokenizer(str(tmp_path_factory.mktemp("tok_tpl")))


@pytest.fixture(scope="module")
def ours(tok_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return transformers.LlamaTokenizer.from_pretrained(tok_dir, legacy=True, add_bos_token=False,
                                                       add_prefix_space=False)


@pytest.mark.parametrize("messages", PLAIN)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_official_template_equals_transformers(ours, hf, messages, add_generation_prompt):
    assert ours.chat_template == hf.chat_template and "cls_token" in ours.chat_template
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want


@pytest.mark.parametrize("messages", PLAIN + WITH_TOOLS)
@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_thinking_template_equals_transformers(ours, hf, messages, tools, add_generation_prompt):
    t, h = copy.copy(ours), copy.copy(hf)
    t.chat_template = h.chat_template = THINKING
    want = h.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = t.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    assert got == want
    assert got.endswith("<|im_start|>assistant\n<think>\n") == add_generation_prompt
    if tools:
        assert '"name": "get_weather"' in got
    if messages is WITH_TOOLS[0]:
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in got
        assert "<think>\nTwo calls are needed.\n</think>" in got and "<tool_output>\n12:00\n" in got


def test_template_from_chat_template_jinja_wins_and_kwargs_reach_it(tmp_path, tok_dir):
    import shutil

    shutil.copytree(tok_dir, tmp_path / "t")
    (tmp_path / "t" / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}<nothink>{% endif %}", encoding="utf-8")
    t = Tokenizer.from_pretrained(tmp_path / "t")
    msgs = [{"role": "user", "content": "x"}]
    assert t.apply_chat_template(msgs) == "<s>[user]x"
    assert t.apply_chat_template(msgs, enable_thinking=False) == "<s>[user]x<nothink>"


def test_sandbox_and_transformers_globals():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="no assistant"):
        render_chat_template("{{ raise_exception('no assistant') }}", msgs)
    with pytest.raises(ChatTemplateError):  # the sandbox refuses Python internals
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", msgs)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% if %}", msgs)
    out = render_chat_template("{{ {'a': '<é>'} | tojson }}{% generation %}G{% endgeneration %}"
                               "{% for i in range(3) %}{% if i == 1 %}{% break %}{% endif %}{{ i }}{% endfor %}", msgs)
    assert out == '{"a": "<é>"}G0'
    # reasoning under every name templates read; None-valued keys dropped (transformers' normalisation)
    out = render_chat_template("{{ messages[0].thinking }}|{{ messages[0].content is defined }}",
                               [{"role": "assistant", "reasoning_content": "r", "content": None}])
    assert out == "r|False"

"""The chat page in headless Chromium: type, press Enter, see the streamed reply; keeps the conversation."""

from __future__ import annotations

import json
import os

import pytest

from tests.serve.cdp import Browser, find_chromium
from tests.serve.util import SERVED_NAME

LAST_REPLY = "(() => { const m = [...document.querySelectorAll('.msg.assistant')]; return m.length ? " \
             "{text: m[m.length-1].querySelector('.text').textContent, meta: m[m.length-1].querySelector('.meta')" \
             ".textContent, done: m[m.length-1].dataset.done === '1', n: m.length} : null; })()"


def reply_alone(client, messages: list[dict]) -> str:
    """What the API answers to the same conversation, greedy, with the page's max_tokens."""
    res = client.chat.completions.create(model=SERVED_NAME, messages=messages, temperature=0, max_tokens=40)
    return res.choices[0].message.content


def test_chat_page_streams_a_reply_in_chromium(server, client, artifacts_dir):
    exe = find_chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the chat-page test needs it")
    browser = Browser(exe)
    try:
        browser.open(server.url + "/")
        browser.wait_for(f"document.getElementById('model').textContent === 'model: {SERVED_NAME}'")
        # greedy and short, so the page's reply can be compared with the API's answer to the same request
        browser.eval("document.getElementById('temperature').value = '0'; "
                     "document.getElementById('max_tokens').value = '40'; document.getElementById('input').focus()")
        history: list[dict] = []
        for turn, text in enumerate(["hello world", "the quick brown fox"]):
            browser.type_and_enter(text)
            browser.wait_for(f"(() => {{ const r = {LAST_REPLY}; return r && r.n === {turn + 1} && r.done; }})()")
            shown = browser.eval(LAST_REPLY)
            history.append({"role": "user", "content": text})
            assert shown["text"] == reply_alone(client, history), "the page shows the streamed reply verbatim"
            assert "tokens/s" in shown["meta"] and "first token" in shown["meta"]
            history.append({"role": "assistant", "content": shown["text"]})
        assert browser.eval("document.querySelectorAll('.msg.user').length") == 2
        assert browser.eval("document.querySelectorAll('.msg.error').length") == 0
        path = os.path.join(artifacts_dir, "chat_page.png")
        browser.screenshot(path)
        assert os.path.getsize(path) > 5000
        with open(os.path.join(artifacts_dir, "chat_page.json"), "w", encoding="utf-8") as f:
            json.dump(history, f, indent=1, ensure_ascii=False)
    finally:
        browser.close()


def test_chat_page_shows_reasoning_collapsed_and_tool_calls(scripted_server, artifacts_dir):
    """A Thinking model's reply: the thinking in a closed <details>, the answer as text, tool calls listed."""
    import httpx

    from tests.serve.test_chat_features import CALLS, REASONED, TOOLS

    exe = find_chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the chat-page test needs it")
    srv, model, tok = scripted_server
    browser = Browser(exe)
    try:
        browser.open(srv.url + "/")
        browser.wait_for("document.getElementById('model').textContent === 'model: scripted-thinking'")
        browser.eval("document.getElementById('temperature').value = '0'; "
                     "document.getElementById('max_tokens').value = '120'; document.getElementById('input').focus()")
        msgs = [{"role": "user", "content": "what is 2 + 2"}]
        model.prompt_len = httpx.post(srv.url + "/tokenize", json={"messages": msgs}, timeout=30).json()["count"]
        model.script = tok.encode(REASONED)
        browser.type_and_enter(msgs[0]["content"])
        browser.wait_for(f"(() => {{ const r = {LAST_REPLY}; return r && r.done; }})()")
        shown = browser.eval("(() => { const m = document.querySelector('.msg.assistant'); "
                             "const d = m.querySelector('details.reasoning'); return {text: "
                             "m.querySelector('.text').textContent, open: d ? d.open : null, "
                             "reasoning: d ? d.querySelector('.rtext').textContent : null}; })()")
        assert shown == {"text": "The answer is 4.", "open": False, "reasoning": "Let me think about it.\nStep two."}
        # second turn with tools offered (the page's tools box): the calls are listed under the reply
        browser.eval(f"document.getElementById('tools').value = {json.dumps(json.dumps(TOOLS))}; "
                     "document.getElementById('input').focus()")
        history = [*msgs, {"role": "assistant", "content": "The answer is 4.",
                           "reasoning_content": "Let me think about it.\nStep two."},
                   {"role": "user", "content": "and the weather"}]
        model.prompt_len = httpx.post(srv.url + "/tokenize", json={"messages": history, "tools": TOOLS},
                                      timeout=30).json()["count"]
        model.script = tok.encode(CALLS)
        browser.type_and_enter("and the weather")
        browser.wait_for(f"(() => {{ const r = {LAST_REPLY}; return r && r.n === 2 && r.done; }})()")
        tools_text = browser.eval("[...document.querySelectorAll('.msg.assistant')][1].querySelector('.tools')"
                                  ".textContent")
        assert tools_text == ('tool call: get_weather({"city": "Paris"})\ntool call: now({})')
        assert "(tool_calls)" in browser.eval(LAST_REPLY)["meta"]
        browser.screenshot(os.path.join(artifacts_dir, "chat_page_reasoning.png"))
    finally:
        browser.close()

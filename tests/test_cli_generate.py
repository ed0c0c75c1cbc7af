"""`ernie45 generate` and `ernie45 chat` end to end: a tiny random checkpoint with a real SentencePiece
tokenizer, run through the real engine; the CLI's output must equal the library's (`LLM`)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from ernie45 import ModelConfig, init_weights, save_model
from ernie45.cli import main
from ernie45.engine.llm import LLM
from ernie45.model.model import ErnieForCausalLM
from tests.test_tokenizer import write_test_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP_VOCAB = 700
# Small engine settings for every run: a 16 MB KV cache instead of a share of the machine's RAM.
ENGINE_FLAGS = ["--dtype", "float32", "--kv-cache-memory", "16MB"]
GREEDY = ["--temperature", "0", "--max-tokens", "10"]

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode fastest on one thread; two threads on a shared 2-core machine spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """Tiny random MoE checkpoint + test tokenizer in one folder.

    The model's vocabulary is the SentencePiece part only (700 ids): the 1009 added tokens (<|LOC_*|>, ...)
    are all special, and a random model sampling them would produce mostly skipped, empty text.
    """
    folder = str(tmp_path_factory.mktemp("cli-model"))
    cfg = ModelConfig.from_name("tiny-moe").replace(vocab_size=SP_VOCAB, max_position_embeddings=256)
    model = init_weights(ErnieForCausalLM(cfg), std=0.5, seed=3)  # large std: peaked, varied greedy text
    save_model(model, folder)
    write_test_tokenizer(folder, vocab_size=SP_VOCAB)
    return folder


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", kv_cache_memory="16MB")


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ernie45.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def _greedy(max_tokens: int = 10, **kw):
    from ernie45.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def test_generate_streams_the_library_output(model_dir, llm, monkeypatch):
    prompt = "Hello world, the model"
    expected = llm.generate(prompt, _greedy())[0].outputs[0]
    assert expected.text.strip(), "the fixture model should produce visible text"

    writes: list[str] = []

    class Recorder:  # records each write: streaming means several writes, not one at the end
        def write(self, s: str) -> int:
            writes.append(s)
            return len(s)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert main(["generate", model_dir, prompt, *GREEDY, *ENGINE_FLAGS]) == 0
    assert "".join(writes) == expected.text + "\n"
    assert len([w for w in writes if w.strip()]) >= 2


def test_generate_subprocess(model_dir, llm):
    prompt = "我们的模型"
    expected = llm.generate(prompt, _greedy())[0].outputs[0].text
    r = _run(["generate", model_dir, prompt, *GREEDY, *ENGINE_FLAGS])
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert "generated tokens; first token after" in r.stderr and "tok/s" in r.stderr
    assert "finish=length" in r.stderr
    from ernie45 import kernels

    assert f"backend={'cpu' if kernels.available() else 'torch'}]" in r.stderr  # the path that ran


def test_generate_stop_strings(model_dir, llm, capsys):
    prompt = "我们的模型"
    expected = llm.generate(prompt, _greedy())[0].outputs[0].text
    # a stop string cuts the text where it starts (engine semantics), and is not printed
    cut = expected.strip()[2:4]
    stopped = llm.generate(prompt, _greedy(stop=[cut]))[0].outputs[0].text
    assert len(stopped) < len(expected)
    assert main(["generate", model_dir, prompt, *GREEDY, *ENGINE_FLAGS, "--stop", cut, "--stop", "never"]) == 0
    out = capsys.readouterr()
    assert out.out == stopped + "\n" and cut not in out.out and "finish=stop" in out.err


def test_chat_keeps_the_conversation_and_resets(model_dir, llm):
    stdin = "Hi there\nHow are you?\n/reset\n你好\n/exit\nnever answered\n"
    r = _run(["chat", model_dir, *GREEDY, *ENGINE_FLAGS], stdin=stdin)
    assert r.returncode == 0, r.stderr

    p = _greedy()
    one = [{"role": "user", "content": "Hi there"}]
    a1 = llm.chat(one, p)[0].outputs[0].text
    two = [*one, {"role": "assistant", "content": a1}, {"role": "user", "content": "How are you?"}]
    a2 = llm.chat(two, p)[0].outputs[0].text
    a3 = llm.chat([{"role": "user", "content": "你好"}], p)[0].outputs[0].text
    assert r.stdout == f"{a1}\n{a2}\n{a3}\n"
    assert "(conversation reset)" in r.stderr


def test_chat_system_message(model_dir, llm, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", model_dir, "--system", "You are helpful.", *GREEDY, *ENGINE_FLAGS]) == 0
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}]
    assert capsys.readouterr().out == llm.chat(msgs, _greedy())[0].outputs[0].text + "\n"


@pytest.fixture(scope="module")
def stop_model_dir(tmp_path_factory) -> str:
    """A checkpoint whose greedy chat reply to "Hi" ends with <|end_of_sentence|> after a few tokens.

    The (untied) LM-head row of the sep token is set along the final hidden state of the third reply
    position, so that its logit wins there (and possibly earlier), like a trained chat model's turn end.
    """
    from ernie45.tokenizer import Tokenizer

    folder = str(tmp_path_factory.mktemp("cli-stop-model"))
    tok = Tokenizer.from_pretrained(write_test_tokenizer(folder, vocab_size=SP_VOCAB))
    cfg = ModelConfig.from_name("tiny-moe").replace(vocab_size=SP_VOCAB, max_position_embeddings=256,
                                                    tie_word_embeddings=False)
    model = init_weights(ErnieForCausalLM(cfg), std=0.5, seed=3).eval()
    x = torch.tensor([tok.encode_chat([{"role": "user", "content": "Hi"}])])
    with torch.no_grad():
        for _ in range(2):
            x = torch.cat([x, model(x).logits[:, -1:].argmax(-1)], dim=1)
        h = model(x).hidden_states[0, -1]
        model.lm_head.weight[tok.sep_token_id] = 30 * h / h.norm()
    save_model(model, folder)
    return folder


def test_chat_stops_on_end_of_sentence(stop_model_dir, capsys, monkeypatch):
    from ernie45.engine.llm import LLM

    llm = LLM(stop_model_dir, dtype="float32", kv_cache_memory="16MB")
    expected = llm.chat([{"role": "user", "content": "Hi"}], _greedy(max_tokens=20))[0].outputs[0]
    sep = llm.tokenizer.sep_token_id
    assert expected.finish_reason == "stop" and expected.stop_reason == sep and len(expected.token_ids) <= 3
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", stop_model_dir, "--temperature", "0", "--max-tokens", "20", *ENGINE_FLAGS]) == 0
    out = capsys.readouterr()
    assert out.out == expected.text + "\n" and "<|end_of_sentence|>" not in out.out
    assert "reply cut" not in out.err  # it ended on the stop id, not on --max-tokens


@pytest.mark.parametrize("argv, match", [
    (["generate", "/no/such/folder", "hi"], "/no/such/folder"),
    (["generate", "MODEL", "hi", "--top-p", "1.5"], "top_p"),
    (["generate", "MODEL", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "MODEL", "hi", "--max-tokens", "0"], "max_tokens"),
    (["generate", "MODEL", "word " * 400, "--max-model-len", "64"], "64"),
    (["chat", "MODEL", "--top-k", "-5"], "top_k"),
    (["generate", "MODEL", "hi", "--device", "gpu0"], "--device"),
    (["generate", "MODEL", "hi", "--speculative-draft-quant", "int8"], "--speculative-tokens"),
    (["generate", "MODEL", "hi", "--speculative-adaptive"], "--speculative-tokens"),
])
def test_clear_one_line_errors(model_dir, argv, match, capsys):
    argv = [model_dir if a == "MODEL" else a for a in argv]
    assert main([*argv, *ENGINE_FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ernie45 {argv[0]}: error:") and match in err and "\n" not in err, err


def test_folder_without_tokenizer(model_dir, tmp_path, capsys):
    for name in os.listdir(model_dir):
        if name.endswith((".json", ".safetensors")):
            shutil.copy(os.path.join(model_dir, name), tmp_path)
    for verb in (["generate", str(tmp_path), "hi"], ["chat", str(tmp_path)]):
        assert main([*verb, *ENGINE_FLAGS]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path}: no tokenizer.model" in err and f"{verb[0]} needs one" in err


def test_generate_prompt_from_stdin(model_dir, llm, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello world\n"))
    assert main(["generate", model_dir, "-", *GREEDY, *ENGINE_FLAGS]) == 0
    assert capsys.readouterr().out == llm.generate("Hello world", _greedy())[0].outputs[0].text + "\n"


def test_chat_reports_a_too_long_turn_and_goes_on(model_dir, llm, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 400 + "\nHi\n"))
    assert main(["chat", model_dir, *GREEDY, *ENGINE_FLAGS, "--max-model-len", "64"]) == 0
    out = capsys.readouterr()
    assert "ernie45 chat: error:" in out.err and "/reset" in out.err
    # the long turn was dropped from the conversation: the next answer is the one to "Hi" alone
    assert out.out == llm.chat([{"role": "user", "content": "Hi"}], _greedy())[0].outputs[0].text + "\n"


def test_demo_is_the_default_model(capsys, monkeypatch):
    llm = LLM("demo", dtype="float32", kv_cache_memory="64MB")
    flags = ["--temperature", "0", "--max-tokens", "12", "--dtype", "float32", "--kv-cache-memory", "64MB"]
    assert main(["generate", "床前明月光，", *flags]) == 0
    assert capsys.readouterr().out == llm.generate("床前明月光，", _greedy(12))[0].outputs[0].text + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n"))
    assert main(["chat", *flags]) == 0
    expected = llm.chat([{"role": "user", "content": "Hello!"}], _greedy(12))[0].outputs[0].text
    assert capsys.readouterr().out == expected + "\n"


def test_generate_with_quantized_drafts_prints_the_plain_output(capsys):
    """--speculative-tokens with --speculative-draft-quant on the demo (it has an MTP block): in fp32 the text is the
    plain run's, and the closing line reports the drafting."""
    argv = ["generate", "demo", "Fortune favours", "--temperature", "0", "--max-tokens", "16", *ENGINE_FLAGS]
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert main([*argv, "--speculative-tokens", "2", "--speculative-draft-quant", "int8"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out and plain.out.strip()
    assert "speculative:" in spec.err and "drafts accepted" in spec.err, spec.err
    assert main([*argv, "--speculative-tokens", "2", "--speculative-adaptive"]) == 0
    adaptive = capsys.readouterr()
    assert adaptive.out == plain.out
    # fewer steps than the controller's first window (16): all of them drafting
    assert re.search(r"speculative: .* \(drafting in (\d+) of \1 steps\)", adaptive.err), adaptive.err

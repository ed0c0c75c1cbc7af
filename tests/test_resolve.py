"""One model-name resolver for every entry point, and saved folders that open everywhere."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from ernie45 import CheckpointError, ModelConfig, load_model, resolve, save_model
from ernie45.assets import demo_path
from ernie45.cli import main
from ernie45.engine import LLM, SamplingParams
from ernie45.tokenizer import Tokenizer, TokenizerError

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_the_order_is_path_then_demo_then_preset(tmp_path, monkeypatch):
    demo = demo_path()
    assert resolve.resolve("demo") == resolve.ModelRef("demo", "demo", folder=demo)
    assert resolve.resolve(os.path.join(demo, "config.json")).folder == demo  # a file means its folder
    assert resolve.resolve("baidu/ERNIE-4.5-21B-A3B-PT").kind == "preset"
    assert resolve.model_config("ernie-4.5-21b-a3b") == ModelConfig.from_name("ernie-4.5-21b-a3b")
    assert resolve.model_config("demo") == ModelConfig.from_json(demo)
    monkeypatch.chdir(tmp_path)
    os.mkdir("demo")  # a folder of that name in the working directory wins, as any path does
    assert resolve.resolve("demo").kind == "folder" and resolve.checkpoint_folder("demo") == "demo"
    with pytest.raises(resolve.ModelNameError, match=r"no-such: no such file or folder.*'demo'.*ernie-4.5-21b-a3b"):
        resolve.resolve("no-such")
    with pytest.raises(resolve.ModelNameError, match="is a preset: a shape without weights"):
        resolve.checkpoint_folder("ernie-4.5-0.3b")


def test_every_entry_point_takes_the_same_names(capsys):
    """demo, a folder and a file in it work in load_model, Tokenizer, LLM and the info verb; a preset works where a
    shape is enough (info) and is one clear error where weights are needed."""
    demo = demo_path()
    for name in ("demo", demo, os.path.join(demo, "config.json")):
        assert main(["info", name, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["params_total"] == ModelConfig.from_json(demo).num_params()
        assert Tokenizer.from_pretrained(name).encode("Fortune favours") == \
            Tokenizer.from_pretrained(demo).encode("Fortune favours")
    assert main(["info", "ernie-4.5-21b-a3b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 28
    with pytest.raises(CheckpointError, match="is a preset"):
        load_model("ernie-4.5-21b-a3b")
    with pytest.raises(TokenizerError, match="is a preset"):
        Tokenizer.from_pretrained("ernie-4.5-21b-a3b")
    assert main(["generate", "ernie-4.5-21b-a3b", "hi"]) == 2
    assert "is a preset" in capsys.readouterr().err
    assert main(["info", "no-such-model"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_saved_folder_opens_everywhere(tmp_path):
    """save_model copies the tokenizer and generation files of the folder the model came from (or of
    ``tokenizer=``): LLM and the generate verb take the folder alone and give the demo's tokens."""
    model = load_model("demo", dtype=torch.float32)
    want = LLM("demo", dtype="float32", kv_cache_memory="16MB").generate(["Fortune favours"], GREEDY)[0].outputs[0]
    save_model(model, tmp_path / "copy")
    for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "config.json"):
        assert (tmp_path / "copy" / f).is_file(), f
    got = LLM(str(tmp_path / "copy"), dtype="float32", kv_cache_memory="16MB").generate(["Fortune favours"], GREEDY)
    assert got[0].outputs[0].token_ids == want.token_ids and got[0].outputs[0].text == want.text
    # a model built in memory has no folder: tokenizer= names one (any model name, or a Tokenizer from a folder)
    fresh = ModelConfig.from_json(demo_path())
    from ernie45 import ErnieForCausalLM, init_weights

    built = init_weights(ErnieForCausalLM(fresh), seed=0)
    save_model(built, tmp_path / "bare")
    assert not (tmp_path / "bare" / "tokenizer.model").exists()
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(str(tmp_path / "bare"), dtype="float32", kv_cache_memory="16MB").generate(["x"], GREEDY)
    save_model(built, tmp_path / "named", tokenizer=Tokenizer.from_pretrained("demo"))
    out = LLM(str(tmp_path / "named"), dtype="float32", kv_cache_memory="16MB").generate(["Fortune"], GREEDY)
    assert len(out[0].outputs[0].token_ids) == 6
    # saving over the folder the model came from leaves its files alone
    shutil.copytree(tmp_path / "copy", tmp_path / "again")
    again = load_model(tmp_path / "again", dtype=torch.float32)
    save_model(again, tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (tmp_path / "copy" / "tokenizer.model").read_bytes()

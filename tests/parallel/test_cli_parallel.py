"""`ernie45 serve --tp/--ep` and `ernie45 train --ep/--fsdp` refuse impossible layouts before starting torchrun."""

from __future__ import annotations

import pytest
import yaml

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights, save_model
from ernie45.cli import main


def test_serve_impossible_tp_is_one_line_error(tmp_path, capsys):
    save_model(init_weights(ErnieForCausalLM(ModelConfig.from_name("tiny-moe")), seed=0), tmp_path)
    assert main(["serve", str(tmp_path), "--tp", "3"]) == 2
    assert "tp=3 does not divide num_attention_heads=4" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--ep", "3"]) == 2
    assert "8 experts cannot be split evenly over ep=3 ranks" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--ep", "3"], "8 experts cannot be split evenly over ep=3"),
    (["--ep", "2", "--fsdp", "3"], "--ep 2 does not divide --fsdp 3"),
])
def test_train_impossible_layout_is_one_line_error(tmp_path, capsys, flags, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(task="pretrain", output_dir=str(tmp_path / "out"), tokenizer="t",
                                          model={"preset": "tiny-moe"}, data=["x"], batch_size=4)))
    assert main(["train", "pretrain", "--config", str(recipe), *flags]) == 2
    assert message in capsys.readouterr().err

"""One resolver for the model names every entry point takes.

``load_model``, ``LLM``/``LLMEngine``, ``Tokenizer.from_pretrained``, ``save_model(tokenizer=...)`` and the verbs
(``generate``, ``chat``, ``serve``, ``quantize``, ``info``, ``plan``, ``train``'s ``init_from``/``tokenizer``) all
read a model name the same way, in this order:

1. an existing path: a checkpoint folder, or a file inside one (``config.json``, a shard), meaning its folder;
2. ``demo``: the model bundled with the package (``ernie45/assets/demo``);
3. a preset (``ModelConfig.from_name``: ``ernie-4.5-21b-a3b``, ``baidu/ERNIE-4.5-21B-A3B-PT``, ``tiny-moe``, ...):
   a shape without weights, which is all ``info`` and ``plan`` need; where weights are needed it is one error
   saying so.

Also here: the files a checkpoint folder carries besides config and weights (tokenizer, generation defaults),
copied along whenever a model is written somewhere else, so that every saved folder opens everywhere.
Standard library only (the CLI imports this before torch).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Literal

DEMO = "demo"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json", "chat_template.jinja", "generation_config.json")
"""What a checkpoint folder needs besides config.json and weights to open everywhere: the tokenizer files and the
sampling defaults. ``save_model`` copies them along."""
DOC_FILES = ("README.md", "LICENSE")
"""The model card and license: copied by ``ernie45 quantize`` (same weights, another format), not by training."""


class ModelNameError(ValueError):
    """A model name that is not a folder, a file in one, ``demo`` or a preset (or a preset where weights are
    needed); the message says which forms are accepted."""


@dataclass(frozen=True)
class ModelRef:
    """What a model name points to: ``folder`` for checkpoints (demo included), ``preset`` for shapes."""

    name: str
    kind: Literal["folder", "demo", "preset"]
    folder: str | None = None
    preset: str | None = None


def resolve(name: str | os.PathLike) -> ModelRef:
    """Resolve a model name (see the module docstring for the order); raises ModelNameError."""
    p = os.fspath(name)
    if os.path.exists(p):
        return ModelRef(p, "folder", folder=os.path.dirname(os.path.abspath(p)) if os.path.isfile(p) else p)
    if p == DEMO:
        from ernie45 import assets

        return ModelRef(p, "demo", folder=assets.demo_path())
    from ernie45.config import PRESETS, ModelConfig

    try:
        ModelConfig.from_name(p)
    except ValueError:
        raise ModelNameError(f"{p}: no such file or folder, and not 'demo' or a preset; give a checkpoint folder "
                             f"(config.json, *.safetensors, tokenizer.model), 'demo', or (where a shape is enough) "
                             f"a preset: {', '.join(sorted(PRESETS))}") from None
    return ModelRef(p, "preset", preset=p)


def checkpoint_folder(name: str | os.PathLike) -> str:
    """The checkpoint folder a name points to (a folder, a file in one, or ``demo``); a preset is an error naming
    what to give instead (presets have no weights or tokenizer)."""
    try:
        ref = resolve(name)
    except ModelNameError:
        raise ModelNameError(f"{os.fspath(name)}: no such file or folder; give a checkpoint folder (config.json, "
                             f"*.safetensors, tokenizer.model) or 'demo'") from None
    if ref.folder is None:
        raise ModelNameError(f"{ref.name!r} is a preset: a shape without weights or tokenizer; give a checkpoint "
                             f"folder (e.g. a download of baidu/ERNIE-4.5-*-PT) or 'demo'")
    return ref.folder


def model_config(name: str | os.PathLike):  # noqa: ANN201 - ModelConfig (imported lazily)
    """The ModelConfig of a folder, a file in one, ``demo`` or a preset."""
    from ernie45.config import ModelConfig

    ref = resolve(name)
    return ModelConfig.from_name(ref.preset) if ref.kind == "preset" else ModelConfig.from_json(ref.folder)


def copy_files(src: str | os.PathLike, dst: str | os.PathLike, names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copy the files ``names`` present in the checkpoint ``src`` (any model name) into the folder ``dst``. Returns
    the names copied; a file already there is replaced atomically, the same folder is left alone."""
    src, dst = checkpoint_folder(src), os.fspath(dst)
    if os.path.realpath(src) == os.path.realpath(dst):
        return []
    copied = []
    for name in names:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            tmp = os.path.join(dst, f".{name}.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, os.path.join(dst, name))
            copied.append(name)
    return copied

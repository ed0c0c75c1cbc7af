"""Files shipped inside the package: the bundled demo model (``ernie45/assets/demo/``)."""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def demo_path() -> str:
    """Folder of the bundled demo model: a small ERNIE-architecture MoE with its own tokenizer, trained by
    ``scripts/build_demo.sh`` (an HF checkpoint folder; ``load_model("demo")`` resolves to it)."""
    path = os.path.join(_HERE, "demo")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: the demo model is missing from this installation; rebuild it with "
                                f"scripts/build_demo.sh or reinstall ernie45")
    return path

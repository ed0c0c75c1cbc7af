"""ERNIEKit / FastDeploy ``-Paddle`` checkpoint folders (PaddlePaddle safetensors) into ``ErnieForCausalLM``.

The Paddle layout, as Baidu's own converter undoes it (``tools/paddle2torch/tran_4_5t.py`` in PaddlePaddle/ERNIE,
summarised in spec §3.2) and as a published 300B ``-Paddle`` header shows it (tensor dump in Hchnr/test
``load/safe_open.output.numpy``: ``ernie.layers.16.self_attn.qkv_proj.weight`` (8192, 10240),
``...experts.1.up_gate_proj.weight`` (8192, 7168), ``...experts.1.down_proj.weight`` (3584, 8192)):

- names start with ``ernie.`` instead of ``model.``;
- a Paddle ``Linear`` stores its weight as ``[in, out]``: every projection is the transpose of torch's;
- attention is one fused ``qkv_proj`` ``[H, q | k | v]`` (biases fused the same way);
- every SwiGLU (dense MLP, shared experts, each routed expert) is one ``up_gate_proj`` ``[H, gate | up]``;
- the router ``mlp.gate.weight`` is ``[H, E]`` and ``mtp_linear_proj`` ``[2H, H]``; an untied ``lm_head`` is
  ``[H, V]``; ``mlp.moe_statics.e_score_correction_bias`` is ``[1, E]`` as in the -PT files;
- config.json may spell ``model_type`` as Paddle's (``ernie``); we infer ours from ``moe_num_experts``.

Weights stream one tensor at a time into the allocated model (a fused tensor is read, transposed and split).
Quantized releases: FastDeploy's WINT8 / WINT4 are made online from these bf16 weights
(``--quantization wint8``), so ``load_model(folder, quant="int8")`` / ``"int4"`` is the same idea with our
kernels (ours are grouped int4 by default; per-channel via ``group_size=None``). The ``-2Bits-Paddle`` release
(CCQ convolutional codes with ``super_scales`` / ``code_scale`` / ``code_zp``), ``-W4A8C8-TP4-Paddle`` (int8
activations with static scales shipped for 4 GPUs) and ``-FP8-Paddle`` are not read: their tensor encodings are
not documented beyond FastDeploy's CUDA kernels, and a guessed decoder could not be tested against anything.
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch
from tqdm.auto import tqdm

from ernie45.config import MODEL_TYPES, ModelConfig
from ernie45.model.checkpoint import CheckpointError, TensorRef, build_empty, index_checkpoint, read_tensor
from ernie45.model.model import ErnieForCausalLM
from ernie45.utils import resolve_dtype

log = logging.getLogger(__name__)

_TRANSPOSED = re.compile(r"(o_proj|down_proj|mlp\.gate|mtp_linear_proj\.\d+|qkv_proj|up_gate_proj)\.weight$")


def paddle_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the Paddle config ({e})") from None
    if raw.get("model_type") not in MODEL_TYPES:
        raw["model_type"] = "ernie4_5_moe" if raw.get("moe_num_experts") else "ernie4_5"
    return ModelConfig.from_hf_dict(raw, source=path)


def _targets(name: str, t: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor, int | None, str | None]]:
    """(native name, torch-layout tensor, expert, part) pieces of one Paddle tensor."""
    if name.startswith("ernie."):
        name = "model." + name[len("ernie."):]
    if name == "lm_head.weight" or _TRANSPOSED.search(name):
        t = t.t()  # Paddle Linear: [in, out]
    m = re.match(r"(.*\.mlp)\.experts\.(\d+)\.(up_gate_proj|down_proj)\.weight$", name)
    if m:
        stack = "gate_up_proj" if m.group(3) == "up_gate_proj" else "down_proj"
        return [(f"{m.group(1)}.experts.{stack}", t, int(m.group(2)), None)]  # [gate; up] rows: our order
    if ".qkv_proj." in name:
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        if t.shape[0] != q + 2 * kv:
            raise CheckpointError(f"{name}: fused qkv has {t.shape[0]} outputs, the config implies {q} + 2 x {kv}")
        leaf = name.rpartition(".")[2]
        base = name.replace(f"qkv_proj.{leaf}", "")
        return [(f"{base}{p}_proj.{leaf}", part, None, None) for p, part in zip("qkv", t.split([q, kv, kv]))]
    if ".up_gate_proj." in name:
        leaf = name.rpartition(".")[2]
        base = name.replace(f"up_gate_proj.{leaf}", "")
        gate, up = t.chunk(2, dim=0)
        return [(f"{base}gate_proj.{leaf}", gate, None, None), (f"{base}up_proj.{leaf}", up, None, None)]
    if name.endswith("moe_statics.e_score_correction_bias"):
        return [(name.replace("moe_statics.", "gate."), t.reshape(-1), None, None)]
    return [(name, t, None, None)]


@torch.no_grad()
def load_paddle(folder: str, dtype: str | torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                progress: bool | None = None, quant=None, **opts) -> ErnieForCausalLM:  # noqa: ANN001
    """Load a ``-Paddle`` folder (bf16 safetensors in Paddle's layout) as our model. quant= / opts as in
    ``load_model``: the float model is loaded, then quantized (FastDeploy's online WINT8/WINT4 idea)."""
    if quant is not None:
        from ernie45.quant.load import _scheme_from
        from ernie45.quant.quantize import quantize_model

        model = load_paddle(folder, dtype, "cpu", progress)
        quantize_model(model, _scheme_from(quant, opts), progress=progress)
        return model.to(device) if torch.device(device).type != "cpu" else model
    if opts:
        raise TypeError(f"load options {sorted(opts)} need quant=")
    dtype = resolve_dtype(dtype)
    cfg = paddle_config(folder)
    refs, _ = index_checkpoint(folder)
    if cfg.num_nextn_predict_layers and not any(".mtp_" in n for n in refs):
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = build_empty(cfg, dtype)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    filled: dict[str, int] = {}
    order: list[TensorRef] = sorted(refs.values(), key=lambda r: (r.file, r.start))
    for ref in tqdm(order, desc="loading Paddle checkpoint", unit="tensor",
                    disable=None if progress is None else not progress):
        if ref.name.endswith("inv_freq") or (ref.name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if ".mtp_" in ref.name and not cfg.num_nextn_predict_layers:
            continue
        for native, t, expert, _ in _targets(ref.name, read_tensor(ref), cfg):
            if native not in params:
                raise CheckpointError(f"{ref.file}: tensor {ref.name!r} ({native}) does not exist in a model of "
                                      f"this config.json")
            dest = params[native] if expert is None else params[native][expert]
            if tuple(t.shape) != tuple(dest.shape):
                raise CheckpointError(f"{ref.file}: tensor {ref.name!r} gives {native} shape {list(t.shape)}, "
                                      f"expected {list(dest.shape)} (Paddle stores linears as [in, out])")
            dest.copy_(t)
            filled[native] = filled.get(native, 0) + 1
    want = {n for n in model.state_dict() if not (n == "lm_head.weight" and cfg.tie_word_embeddings)}
    missing = sorted(n for n in want if n not in filled and not n.endswith("e_score_correction_bias"))
    missing += [n for n, k in filled.items() if ".experts." in n and k != cfg.moe_num_experts]
    if missing:
        raise CheckpointError(f"{folder}: missing Paddle tensor(s) for {missing[:4]}; the checkpoint is incomplete")
    for n, b in params.items():
        if n.endswith("e_score_correction_bias") and n not in filled:
            b.zero_()
    model.tie_weights()
    model.eval()
    return model.to(device) if torch.device(device).type != "cpu" else model


def to_paddle_tensors(model: ErnieForCausalLM):  # noqa: ANN201 - iterator of (name, tensor)
    """The Paddle-layout tensors of a float model (the inverse of ``_targets``): for tests and ``convert``."""
    cfg = model.config
    sd = model.state_dict()
    done: set[str] = set()
    for name, t in sd.items():
        if name in done or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        pname = "ernie." + name[len("model."):] if name.startswith("model.") else name
        m = re.match(r"(.*)\.(q|k|v)_proj\.(weight|bias)$", name)
        if m:
            parts = [sd[f"{m.group(1)}.{p}_proj.{m.group(3)}"] for p in "qkv"]
            done |= {f"{m.group(1)}.{p}_proj.{m.group(3)}" for p in "qkv"}
            fused = torch.cat(parts)
            yield pname.replace(f"{m.group(2)}_proj", "qkv_proj"), fused.t().contiguous() if fused.dim() == 2 \
                else fused
            continue
        m = re.match(r"(.*)\.(gate|up)_proj\.(weight|bias)$", name)
        if m and ".experts." not in name:
            parts = [sd[f"{m.group(1)}.{p}_proj.{m.group(3)}"] for p in ("gate", "up")]
            done |= {f"{m.group(1)}.{p}_proj.{m.group(3)}" for p in ("gate", "up")}
            fused = torch.cat(parts)
            yield pname.replace(f"{m.group(2)}_proj", "up_gate_proj"), fused.t().contiguous() if fused.dim() == 2 \
                else fused
            continue
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            prefix = pname.rsplit(".", 1)[0]
            leaf = "up_gate_proj" if name.endswith("gate_up_proj") else "down_proj"
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.{leaf}.weight", t[e].t().contiguous()
            continue
        if name.endswith("gate.e_score_correction_bias"):
            yield pname.replace("gate.e_score", "moe_statics.e_score"), t.reshape(1, -1)
            continue
        if name == "lm_head.weight" or (_TRANSPOSED.search(name) and t.dim() == 2):
            yield pname, t.t().contiguous()
            continue
        yield pname, t

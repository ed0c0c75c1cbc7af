"""Sharded loading: every rank reads only its slice of each tensor from the safetensors files.

The model is built on the meta device, parallelized there (so every parameter already has its local
shape and a ``ShardSpec`` saying which box of the global tensor it is), allocated once, and filled
with byte-range reads: a row range of a row-major tensor is one contiguous read; a column range (a
row-parallel weight such as ``o_proj`` or ``down_proj``) is one ``preadv`` per row of exactly the bytes
needed. No rank ever holds a full tensor it does not own, so peak memory is the local share plus one
tensor's worth of dtype-conversion buffer at most.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from ernie45.config import ModelConfig
from ernie45.model.checkpoint import (
    CheckpointError,
    Target,
    TensorRef,
    index_checkpoint,
    plan_load,
    read_tensor,
    reset_nonpersistent_buffers,
    resolve_model_path,
    target_view,
)
from ernie45.model.model import ErnieForCausalLM
from ernie45.parallel import parallelize
from ernie45.parallel.expert_parallel import TokenLayout
from ernie45.parallel.mesh import ParallelMesh
from ernie45.parallel.shard import ShardSpec, collect_specs
from ernie45.utils import resolve_dtype

log = logging.getLogger(__name__)


def read_box(ref: TensorRef, ranges: tuple[tuple[int, int], ...], out: torch.Tensor, fd: int) -> int:
    """Read ``ref[ranges]`` (1-D or 2-D) into ``out``; returns the bytes read from the file."""
    shape = ref.shape
    if len(ranges) != len(shape) or len(shape) > 2:
        raise CheckpointError(f"{ref.file}: cannot read a {len(ranges)}-d slice of {ref.name!r} {list(shape)}")
    box = tuple(b - a for a, b in ranges)
    if tuple(out.shape) != box:
        raise CheckpointError(f"{ref.file}: tensor {ref.name!r} slice {box} does not fit {tuple(out.shape)}")
    direct = out.dtype == ref.dtype and out.is_contiguous() and out.device.type == "cpu"
    buf = out if direct else torch.empty(box, dtype=ref.dtype)
    raw = buf.view(torch.uint8).numpy().reshape(box[0] if box else 1, -1) if buf.numel() else None
    item = ref.dtype.itemsize
    nread = 0
    if raw is not None:
        row_elems = shape[1] if len(shape) == 2 else 1
        if len(shape) == 1 or (ranges[1] == (0, shape[1])):  # whole rows: one contiguous range
            offset = ref.start + ranges[0][0] * row_elems * item
            nread = os.preadv(fd, [raw.reshape(-1)], offset)
            want = raw.size
        else:  # a column range: the bytes of each row
            (r0, _), (c0, _) = ranges
            want = 0
            for i in range(box[0]):
                nread += os.preadv(fd, [raw[i]], ref.start + ((r0 + i) * row_elems + c0) * item)
                want += raw[i].size
        if nread != want:
            raise CheckpointError(f"{ref.file}: truncated while reading tensor {ref.name!r}")
    if not direct:
        out.copy_(buf)
    return nread


def fill_local(param: torch.Tensor, spec: ShardSpec | None, ref: TensorRef, tgt: Target, fd: int) -> int:
    """Write the part of checkpoint tensor ``ref`` (mapped by ``tgt``) that this rank owns into its
    local ``param``; returns bytes read (0 when this rank owns none of it)."""
    if spec is None:  # replicated parameter: the whole tensor, with the loader's layout rules
        dest = target_view(param, tgt)
        if tgt.part == "transposed":
            dest.copy_(read_tensor(ref).t())
            return ref.nbytes
        return read_box(ref, tuple((0, s) for s in ref.shape), dest, fd)
    if tgt.squeeze or tgt.part == "transposed":
        raise AssertionError(f"{ref.name}: sharded parameters are never squeezed or transposed")
    if tgt.expert is None:
        return read_box(ref, spec.ranges, param, fd)
    e0, e1 = spec.ranges[0]
    if not e0 <= tgt.expert < e1:
        return 0  # another ep rank's expert
    dest, ranges = param[tgt.expert - e0], spec.ranges[1:]
    if tgt.part is not None:  # gate or up half of gate_up_proj [2I, H]
        global_half = spec.global_shape[1] // 2
        if spec.halves_dim == 1:
            n = ranges[0][1] - ranges[0][0]
        else:
            n, ranges = global_half, ((0, global_half), ranges[1])
        dest = dest[:n] if tgt.part == "gate" else dest[n:]
    return read_box(ref, ranges, dest, fd)


def sharded_load(path: str | os.PathLike, mesh: ParallelMesh, dtype: str | torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", tokens: TokenLayout = "replicated") -> ErnieForCausalLM:
    """Load an HF checkpoint straight into this rank's shard of ``parallelize(model, mesh)``.

    Every rank of the mesh calls this; each reads only the bytes of its own slices.
    """
    folder = resolve_model_path(path)
    config = ModelConfig.from_json(folder)
    refs, meta = index_checkpoint(folder)
    if "ernie45.quant" in meta:
        raise CheckpointError(f"{folder}: sharded loading of quantized checkpoints is not supported; load the "
                              "unquantized checkpoint")
    config, plan = plan_load(config, refs, folder)
    mesh.sizes.validate(config)
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = ErnieForCausalLM(config)
    model = parallelize(model.to(dtype=dtype), mesh, tokens=tokens)
    model = model.to_empty(device="cpu")
    reset_nonpersistent_buffers(model)
    model.tie_weights()  # to_empty re-creates parameters one by one; re-share a tied head
    if config.extra.get("moe_use_aux_free") is False:
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.zero_()
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    specs = collect_specs(model)
    by_file: dict[str, list[tuple[TensorRef, Target]]] = {}
    for entries in plan.values():
        for ref, tgt in entries:
            by_file.setdefault(ref.file, []).append((ref, tgt))
    nread = 0
    with torch.no_grad():
        for file in sorted(by_file):
            fd = os.open(file, os.O_RDONLY)
            try:
                for ref, tgt in sorted(by_file[file], key=lambda rt: rt[0].start):
                    nread += fill_local(params[tgt.name], specs.get(tgt.name), ref, tgt, fd)
            finally:
                os.close(fd)
    total = sum(r.nbytes for entries in plan.values() for r, _ in entries)
    log.info("sharded load of %s: read %.1f MB of %.1f MB (%.0f%%)", folder, nread / 1e6, total / 1e6,
             100 * nread / max(total, 1))
    model.sharded_load_bytes = nread
    model.eval()
    return model.to(device) if torch.device(device).type != "cpu" else model


def local_nbytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters and buffers (tied tensors counted once)."""
    seen = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(math.prod(t.shape) * t.element_size() for t in seen.values())

"""Where the routed experts live: ``place_experts(model, device, experts_on=..., gpu_experts=...)``.

A pass over a built (plain or quantized) model, as llama.cpp's ``--cpu-moe`` / ``--n-cpu-moe`` and
KTransformers do it: the routed experts (``Experts`` / ``QuantExperts`` stacks, the bulk of an MoE
model's bytes) of the chosen MoE layers stay in host RAM and are computed there by the CPU path (the same
module forward, native C kernels where they apply); attention, shared experts, router, norms, embeddings,
head and the KV cache the engine builds next go to the compute device.

Each offloaded layer's ``MoE`` is swapped for ``HostMoE``. Its forward, per MoE layer:

1. router on the device; the routed tokens' activations, expert ids and weights are copied device -> host
   into pinned buffers (``non_blocking``) and an event is recorded after the copies;
2. the shared experts are queued on the device stream (they run while the host works);
3. the host waits for the event only (the copies, not the shared experts), runs the selected experts with
   the experts module's own forward on host tensors;
4. the result goes host -> device through a pinned buffer (``non_blocking``) and is added to the shared
   experts' output on the device (same order of addition as ``MoE.forward``).

The pinned buffers are shared by every ``HostMoE`` of a model (one exchange) and grow to the largest step.
Reusing them is safe: step 1 of the next layer waits for an event recorded after everything queued before
it, including the previous layer's host -> device copy. With ``device == host == cpu`` the same code runs
with plain buffers, which is what the CPU tests exercise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ernie45.model.checkpoint import parse_size
from ernie45.model.moe import MoE

EXPERTS_ON = ("gpu", "cpu", "auto")


class PlacementError(ValueError):
    """A placement that cannot be applied (bad name, N out of range, not enough memory)."""


@dataclass(frozen=True)
class Placement:
    """The placement applied to a model (``model.placement``)."""

    device: str
    host: str
    moe_layers: int
    gpu_experts: int
    """MoE layers whose routed experts live on ``device`` (the first ones); the rest are on ``host``."""
    device_expert_bytes: int
    host_expert_bytes: int

    @property
    def host_layers(self) -> int:
        return self.moe_layers - self.gpu_experts


def _module_bytes(m: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(m.parameters()) + list(m.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks (plain ``MoE`` or an already placed ``HostMoE``) in layer order."""
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, (MoE, HostMoE))]


def choose_gpu_experts(model: nn.Module, free_bytes: int, reserve_bytes: int) -> int:
    """Largest N such that the non-expert weights, the first N MoE layers' routed experts and ``reserve_bytes``
    (the KV cache budget and activations) fit in ``free_bytes`` of the device. Weights already on a non-cpu
    device count as resident (they are part of what ``free_bytes`` already excludes)."""
    blocks = moe_blocks(model)
    experts = {id(b.experts) for b in blocks}
    resident = lambda t: t.device.type not in ("cpu", "meta")  # noqa: E731
    rest = sum(t.numel() * t.element_size() for _, t in _named_tensors(model, experts) if not resident(t))
    budget = free_bytes - reserve_bytes - rest
    n = 0
    for b in blocks:
        per = sum(t.numel() * t.element_size() for t in list(b.experts.parameters()) + list(b.experts.buffers())
                  if not resident(t))
        if per > budget:
            break
        budget -= per
        n += 1
    return n


def _named_tensors(model: nn.Module, skip: set[int]) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers of ``model`` outside the modules whose ids are in ``skip``."""
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()

    def walk(m: nn.Module, prefix: str) -> None:
        if id(m) in skip:
            return
        for n, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append((prefix + n, t))
        for n, c in m._modules.items():
            if c is not None:
                walk(c, f"{prefix}{n}.")

    walk(model, "")
    return out


def place_experts(model: nn.Module, device: str | torch.device = "cuda", *, experts_on: str = "gpu",
                  gpu_experts: int | None = None, host: str | torch.device = "cpu",
                  free_memory: int | str | None = None, reserve: int | str | None = None) -> Placement:
    """Place ``model`` in place and return the ``Placement`` (also stored as ``model.placement``).

    experts_on: ``"gpu"`` all routed experts on ``device`` (the plain placement; ``gpu_experts=N`` keeps only
    the first N MoE layers' there), ``"cpu"`` all of them in host RAM (``gpu_experts=N``: all but the first
    N), ``"auto"`` the largest N that fits ``free_memory`` (default: the device's free memory now) after the
    non-expert weights and ``reserve`` (default: 10% of the free memory and at least 1 GiB, for the KV cache
    and activations; pass the engine's ``kv_cache_memory`` plus a margin to size it exactly).
    """
    if not isinstance(experts_on, str) or experts_on not in EXPERTS_ON:
        raise PlacementError(f"experts_on={experts_on!r} is not a placement; use one of {', '.join(EXPERTS_ON)}")
    try:
        device, host = torch.device(device), torch.device(host)
    except (RuntimeError, TypeError):
        raise PlacementError(f"device={device!r} / host={host!r}: not a device name (cpu, cuda, cuda:N)") from None
    if host.type != "cpu":
        raise PlacementError(f"host={host}: the routed experts' host must be the cpu (its RAM and CPU kernels)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlacementError(f"device={device}: this machine has no CUDA device (use device='cpu')")
    blocks = moe_blocks(model)
    if not blocks:
        raise PlacementError("the model has no MoE layer: there are no routed experts to place (a dense model)")
    if gpu_experts is not None:
        if isinstance(gpu_experts, bool) or not isinstance(gpu_experts, int) or gpu_experts < 0:
            raise PlacementError(f"gpu_experts={gpu_experts!r} must be an integer >= 0")
        if gpu_experts > len(blocks):
            raise PlacementError(f"gpu_experts={gpu_experts} exceeds the model's {len(blocks)} MoE layers; "
                                 f"use 0..{len(blocks)}")
        if experts_on == "auto":
            raise PlacementError("gpu_experts=N and experts_on='auto' both choose N; give one of them")
    if experts_on == "auto":
        if free_memory is None:
            if device.type != "cuda":
                raise PlacementError(f"experts_on='auto' on {device} needs free_memory= (the device's free bytes "
                                     "are only queried on CUDA)")
            free_memory = torch.cuda.mem_get_info(device)[0]
        free = parse_size(free_memory)
        reserve_b = parse_size(reserve) if reserve is not None else max(1 << 30, free // 10)
        n = choose_gpu_experts(model, free, reserve_b)
    elif gpu_experts is not None:
        n = gpu_experts
    else:
        n = len(blocks) if experts_on == "gpu" else 0
    exchange = _Exchange(device, host)
    dev_bytes = host_bytes = 0
    layers = [layer for layer in model.model.layers if isinstance(layer.mlp, (MoE, HostMoE))]
    for i, layer in enumerate(layers):
        block = layer.mlp
        moe = block.unwrap() if isinstance(block, HostMoE) else block
        size = _module_bytes(moe.experts)
        if i < n:
            layer.mlp = moe  # its experts move to the device with the rest below
            dev_bytes += size
        else:
            moe.experts.to(host)
            layer.mlp = HostMoE(moe, exchange)
            host_bytes += size
    model.to(device)  # HostMoE keeps its experts where they are (see HostMoE._apply)
    placement = Placement(str(device), str(host), len(blocks), n, dev_bytes, host_bytes)
    model.placement = placement
    return placement


class _Exchange:
    """Host buffers shared by the HostMoE blocks of one model: pinned when the device is a GPU."""

    def __init__(self, device: torch.device, host: torch.device) -> None:
        self.device, self.host = device, host
        self.pin = device.type == "cuda"
        self.bufs: dict[tuple, torch.Tensor] = {}

    def buffer(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.dtype, tuple(like.shape[1:]))
        buf = self.bufs.get(key)
        if buf is None or buf.shape[0] < rows:
            cap = max(rows, 2 * buf.shape[0] if buf is not None else 16)
            buf = torch.empty((cap, *like.shape[1:]), dtype=like.dtype, device=self.host, pin_memory=self.pin)
            self.bufs[key] = buf
        return buf[:rows]


class HostMoE(nn.Module):
    """``MoE`` with its routed experts on the host (see the module docstring for one forward).

    ``gate``, ``shared_experts`` and ``experts`` keep ``MoE``'s names, so state dicts and checkpoints are the same.
    ``.to()`` / ``.float()`` on the model move and cast only the device part: the experts stay on the host."""

    def __init__(self, moe: MoE, exchange: _Exchange) -> None:
        super().__init__()
        self.gate = moe.gate
        self.experts = moe.experts
        self.shared_experts = moe.shared_experts
        self._moe = (moe,)  # a tuple: not a registered submodule; it shares gate, experts and shared_experts
        self.exchange = exchange

    def unwrap(self) -> MoE:
        """The ``MoE`` block this one replaced (the same submodules)."""
        return self._moe[0]

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        self.gate._apply(fn)
        if self.shared_experts is not None:
            self.shared_experts._apply(fn)
        return self

    def forward(self, x_BTH: torch.Tensor, router_records: list | None = None) -> torch.Tensor:
        shape = x_BTH.shape
        x_TH = x_BTH.reshape(-1, shape[-1])
        probs_TE, w_TK, idx_TK = self.gate(x_TH)
        if router_records is not None:
            router_records.append((probs_TE, idx_TK))
        ex, t = self.exchange, x_TH.shape[0]
        xh = ex.buffer("x", t, x_TH)
        ih = ex.buffer("idx", t, idx_TK)
        wh = ex.buffer("w", t, w_TK)
        xh.copy_(x_TH, non_blocking=True)
        ih.copy_(idx_TK, non_blocking=True)
        wh.copy_(w_TK, non_blocking=True)
        ready = None
        if x_TH.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        shared_TH = self.shared_experts(x_TH) if self.shared_experts is not None else None  # queued on the device
        if ready is not None:
            ready.synchronize()  # the copies only: the shared experts keep running on the device
        yh = self.experts(xh, ih, wh)
        if ex.pin:
            out = ex.buffer("y", t, yh)
            out.copy_(yh)
            yh = out
        y_TH = yh.to(x_TH.device, non_blocking=True)
        if shared_TH is not None:
            y_TH = y_TH + shared_TH  # added after the routed sum, as MoE.forward
        return y_TH.view(shape)

    def extra_repr(self) -> str:
        return f"experts on {self.exchange.host}, rest on {self.exchange.device}"

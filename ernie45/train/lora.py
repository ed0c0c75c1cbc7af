"""LoRA (Hu et al. 2021) by wrapping modules from outside: linears, and the stacked MoE experts.

y = W x + (α/r) · B A x with A [r, in] (Kaiming-uniform), B [out, r] (zeros), so a fresh adapter
leaves the model unchanged. For the stacked ``Experts`` every expert gets its own pair: A [E, r, in],
B [E, out, r] for gate_up_proj and down_proj, applied in the per-expert hook ``expert_forward``.

Shape suffixes: T tokens, H hidden, E experts, R rank, I expert width.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ernie45.model.layers import Linear
from ernie45.model.moe import Experts
from ernie45.utils import atomic_path, atomic_write_text

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"]


@dataclass
class LoRAConfig:
    r: int = 8
    """Rank of each adapter."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / r) · B A."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Module names (last component) to adapt: linears, and 'experts' for the stacked routed experts.
    The router (mlp.gate) and lm_head are never adapted."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r={self.r!r} must be a positive integer")
        unknown = set(self.targets) - set(DEFAULT_TARGETS)
        if unknown:
            raise ValueError(f"lora targets {sorted(unknown)} are not adaptable; choose from {DEFAULT_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, scale: float) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_B @ self.lora_A * self.scale).to(self.base.weight.dtype)
        return self.base


class LoRAExperts(Experts):
    """Stacked experts sharing the base tensors, each expert with its own low-rank pair."""

    def __init__(self, base: Experts, r: int, scale: float) -> None:
        nn.Module.__init__(self)
        self.num_experts, self.width = base.num_experts, base.width
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj  # same Parameters, frozen
        self.scale = scale
        e, two_i, h = base.gate_up_proj.shape
        kw = dict(dtype=base.gate_up_proj.dtype, device=base.gate_up_proj.device)
        self.gate_up_A = nn.Parameter(torch.empty(e, r, h, **kw))  # [E, R, H]
        self.gate_up_B = nn.Parameter(torch.zeros(e, two_i, r, **kw))  # [E, 2I, R]
        self.down_A = nn.Parameter(torch.empty(e, r, base.width, **kw))  # [E, R, I]
        self.down_B = nn.Parameter(torch.zeros(e, h, r, **kw))  # [E, H, R]
        for a in (self.gate_up_A, self.down_A):
            for i in range(e):
                nn.init.kaiming_uniform_(a.data[i], a=math.sqrt(5))

    def expert_forward(self, e: int, x_TH: torch.Tensor) -> torch.Tensor:
        gu = F.linear(x_TH, self.gate_up_proj[e]) + F.linear(F.linear(x_TH, self.gate_up_A[e]),
                                                             self.gate_up_B[e]) * self.scale
        gate, up = gu.chunk(2, dim=-1)
        a_TI = F.silu(gate) * up
        return F.linear(a_TI, self.down_proj[e]) + F.linear(F.linear(a_TI, self.down_A[e]),
                                                            self.down_B[e]) * self.scale

    def merged(self) -> Experts:
        out = Experts.__new__(Experts)
        nn.Module.__init__(out)
        out.num_experts, out.width = self.num_experts, self.width
        with torch.no_grad():
            self.gate_up_proj += (torch.bmm(self.gate_up_B, self.gate_up_A) * self.scale).to(self.gate_up_proj.dtype)
            self.down_proj += (torch.bmm(self.down_B, self.down_A) * self.scale).to(self.down_proj.dtype)
        out.gate_up_proj, out.down_proj = self.gate_up_proj, self.down_proj
        return out


def _targets(model: nn.Module, config: LoRAConfig) -> list[tuple[nn.Module, str, nn.Module]]:
    found = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full == "lm_head" or ".gate." in full + ".":
                continue
            if child_name in config.targets and type(child) in (nn.Linear, Linear):
                found.append((mod, child_name, child))
            elif child_name == "experts" and "experts" in config.targets and type(child) is Experts:
                found.append((mod, child_name, child))
    return found


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze every parameter and wrap the targeted modules with adapters (in place). Returns model."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = _targets(model, config)
    if not found:
        raise ValueError(f"lora targets {config.targets} match no module of this model")
    for parent, name, child in found:
        cls = LoRAExperts if isinstance(child, Experts) else LoRALinear
        setattr(parent, name, cls(child, config.r, config.scale))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "gate_up_A", "gate_up_B", "down_A", "down_B")}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap (in place): a plain model for export."""
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, (LoRALinear, LoRAExperts)):
                setattr(mod, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_adapter(model: nn.Module, folder: str, config: LoRAConfig, base: str | None = None) -> None:
    """Adapters alone: adapter_model.safetensors + adapter_config.json (rank, alpha, targets, base)."""
    tensors = lora_state_dict(model)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora first")
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, ADAPTER_WEIGHTS)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "ernie45.lora": "1"})
    atomic_write_text(os.path.join(folder, ADAPTER_CONFIG),
                      json.dumps({**asdict(config), "base_model": base, "format": "ernie45-lora"}, indent=2) + "\n")


def load_adapter(model: nn.Module, folder: str, merge: bool = False) -> nn.Module:
    """Wrap ``model`` with the adapter saved in ``folder`` and load its weights; ``merge`` folds it in
    (for generation at base speed)."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: no {ADAPTER_CONFIG}; not a LoRA adapter folder")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    config = LoRAConfig(r=raw["r"], alpha=raw["alpha"], targets=raw["targets"])
    apply_lora(model, config)
    tensors = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
    own = lora_state_dict(model)
    if set(tensors) != set(own):
        raise ValueError(f"{folder}: adapter tensors do not match this model (e.g. missing "
                         f"{sorted(set(own) - set(tensors))[:3]}, extra {sorted(set(tensors) - set(own))[:3]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{folder}: {n} has shape {tuple(t.shape)}, the model expects "
                                 f"{tuple(params[n].shape)} (adapter trained on another model shape?)")
            params[n].copy_(t)
    return merge_lora(model) if merge else model

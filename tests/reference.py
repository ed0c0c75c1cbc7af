"""Build transformers reference models with weights large enough that a wrong detail shows.

Random init at std 0.02 gives logits near zero, where a wrong RoPE layout or a leaked router bias hides
under any tolerance. Here every matrix gets std 1/sqrt(fan_in) (activations stay O(1)), norms get
weights around 1, the router gets sharp logits, and the correction bias is large enough to change
which experts are picked.
"""

from __future__ import annotations

import torch

from ernie45.config import ModelConfig


def hf_model(config: ModelConfig, seed: int = 0, bias_scale: float = 0.3):
    """A transformers Ernie4_5(Moe)ForCausalLM in fp32 with informative random weights."""
    import transformers

    hf_cfg = config.to_hf_dict()
    hf_cfg.pop("architectures")
    model_type = hf_cfg.pop("model_type")
    if model_type == "ernie4_5_moe":
        cfg = transformers.Ernie4_5_MoeConfig(**hf_cfg)
        cls = transformers.Ernie4_5_MoeForCausalLM
    else:
        for k in [k for k in hf_cfg if k.startswith("moe_")]:
            hf_cfg.pop(k)
        cfg = transformers.Ernie4_5Config(**hf_cfg)
        cls = transformers.Ernie4_5ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    scale_weights(model, seed, bias_scale)
    return model


@torch.no_grad()
def scale_weights(model: torch.nn.Module, seed: int = 0, bias_scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        shape = p.shape
        if name.endswith("e_score_correction_bias"):
            p.copy_(torch.rand(shape, generator=g) * bias_scale)
        elif "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(shape, generator=g))
        elif name.endswith("gate.weight") and p.dim() == 2 and "experts" not in name:
            p.copy_(torch.randn(shape, generator=g) * 2.0 / shape[1] ** 0.5)  # router: sharp softmax
        elif "embed_tokens" in name:
            p.copy_(torch.randn(shape, generator=g))
        else:
            fan_in = shape[-1]
            p.copy_(torch.randn(shape, generator=g) / fan_in**0.5)


def act_quant_ref(x_MK: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The activations ``ernie45.kernels.qgemm`` multiplies with, written independently of it: each block of
    ``block`` columns scaled by max|x| / 127 in fp32, rounded half to even, clamped to +-127, and scaled back.
    Returns fp64 so a reference matmul adds no rounding of its own."""
    m, k = x_MK.shape
    xb = x_MK.float().reshape(m, k // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    # A tensor / tensor division: ``127.0 / amax`` is computed as 127 * (1 / amax) and can move an exact tie.
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = (xb * inv).round().clamp(-127, 127)
    return (q.double() * (amax / 127.0).double()).reshape(m, k)

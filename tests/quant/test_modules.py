"""Quantized modules against dequantize-then-matmul, the kernel/dequant dispatch, and quantize_model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights, kernels
from ernie45.accel import accelerate
from ernie45.accel.cpu import NATIVE, choice
from ernie45.accel.cpu.quant import kernel_args
from ernie45.accel.swap import swap
from ernie45.model.layers import Linear
from ernie45.model.moe import Experts
from ernie45.quant import QuantConfig, QuantExperts, QuantLinear, TensorScheme, modules, quantize_model
from ernie45.quant.quantize import qweights
from ernie45.quant.scheme import BASE
from tests.reference import act_quant_ref

SCHEMES = {  # scheme, layout without the native kernels (with them: "span" where the shape fits)
    "int8-channel": (TensorScheme(8, None, True), "int8"),
    "int8-g64": (TensorScheme(8, 64), "packed"),
    "int4-g128": (TensorScheme(4, 128), "int4"),
    "int4-g32-hqq": (TensorScheme(4, 32, method="hqq"), "int4"),
    "int2-g64": (TensorScheme(2, 64), "packed"),
    "int6-g64": (TensorScheme(6, 64), "packed"),
    "int2-g64-hqq": (TensorScheme(2, 64, method="hqq"), "packed"),
    "int2-g64-mse": (TensorScheme(2, 64, method="mse"), "packed"),
    # GGUF's exact schemes (formats.ggml.EXACT): Q8_0, Q4_K, Q5_K, Q6_K
    "int8-g32-sym": (TensorScheme(8, 32, symmetric=True), "packed"),
    "int4-g32": (TensorScheme(4, 32), "int4"),
    "int6-g32": (TensorScheme(6, 32), "packed"),
    "int6-g16-sym": (TensorScheme(6, 16, symmetric=True), "packed"),
}


NATIVE_OR_NOT = [*(pytest.param(isa, marks=pytest.mark.native(isa), id=f"native-{isa}") for isa in kernels.ISAS),
                 pytest.param(False, id="torch")]  # each kernel build (the native_isa fixture makes it active), torch


def native(module: nn.Module) -> nn.Module:
    """The cpu backend's version of a module (``ernie45.accel``): the span layout's decode kernels."""
    swap(module, NATIVE)
    return module


@pytest.mark.parametrize("use_native", NATIVE_OR_NOT)
@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_matches_dequantize_then_matmul(name: str, rows: int, dtype: torch.dtype, use_native: str | bool
                                                    ) -> None:
    scheme, layout = SCHEMES[name]
    torch.manual_seed(0)
    lin = nn.Linear(256, 128, bias=True).to(dtype)
    with kernels.use_kernels(bool(use_native)):
        q = QuantLinear.from_linear(lin, scheme)
        if use_native:
            native(q)
        span = bool(use_native) and kernels.span_ok(256, scheme.bits, scheme.group_for(256), 128)
        assert q.layout == ("span" if span else layout)
        x = torch.randn(rows, 256, dtype=dtype)
        # The span kernel (few rows) multiplies int8-quantized activations: the reference does the same.
        kernel = span and rows <= modules.KERNEL_MAX_ROWS
        xr = act_quant_ref(x, kernels.xblock(256, scheme.group_for(256), scheme.bits)).float() if kernel else x.float()
        ref = xr @ q.dequantize(dtype=torch.float32).t() + lin.bias.float()
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(q(x).float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    # and the dequantized weight is close to the original (the scheme works at all)
    w = lin.weight.float()
    rel = ((q.dequantize(dtype=torch.float32) - w).norm() / w.norm()).item()
    assert rel < {8: 0.02, 6: 0.04, 4: 0.15, 2: 0.6}[scheme.bits], rel


@pytest.mark.parametrize("isa", [pytest.param(i, marks=pytest.mark.native(i), id=i) for i in kernels.ISAS])
@pytest.mark.parametrize("name", ["int8-channel", "int4-g128", "int2-g64"])
def test_rows_not_in_tiles_of_16_keep_another_layout(isa: str, name: str) -> None:
    """The 8/4/2-bit span layouts hold rows in tiles of 16: a linear with 24 outputs keeps another layout under the
    cpu backend and still computes right; 32 outputs take the span layout."""
    scheme, _ = SCHEMES[name]
    torch.manual_seed(0)
    for n in (24, 32):
        lin = nn.Linear(256, n, bias=False)
        with kernels.use_kernels(True):
            q = native(QuantLinear.from_linear(lin, scheme))
            assert (q.layout == "span") == (n == 32), (n, q.layout)
            x = torch.randn(3, 256)
            xr = act_quant_ref(x, kernels.xblock(256, scheme.group_for(256), scheme.bits)).float() if n == 32 else x
            ref = xr @ q.dequantize(dtype=torch.float32).t()
            torch.testing.assert_close(q(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("use_native", NATIVE_OR_NOT)
@pytest.mark.parametrize("name", ["int8-channel", "int4-g128", "int2-g64"])
def test_kernel_and_dequant_paths_agree(name: str, use_native: str | bool, monkeypatch: pytest.MonkeyPatch) -> None:
    scheme, _ = SCHEMES[name]
    with kernels.use_kernels(bool(use_native)):
        q = native(QuantLinear.from_linear(nn.Linear(256, 64, bias=False).bfloat16(), scheme))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    monkeypatch.setattr(modules, "KERNEL_MAX_ROWS", 16)  # torch's int8/int4 kernels (the aten layouts)
    y_kernel = q(x)
    monkeypatch.setattr(modules, "KERNEL_MAX_ROWS", 0)
    with choice.using(choice.everywhere(False)):  # and the native one (the span layout): dequantize + GEMM
        y_deq = q(x)
    torch.testing.assert_close(y_kernel.float(), y_deq.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("use_native", NATIVE_OR_NOT)
@pytest.mark.parametrize("layout_scheme", ["int8-channel", "int4-g128", "int2-g64"])
def test_get_set_round_trip(layout_scheme: str, use_native: str | bool) -> None:
    scheme, _ = SCHEMES[layout_scheme]
    with kernels.use_kernels(bool(use_native)):
        q = QuantLinear.from_linear(nn.Linear(256, 64).bfloat16(), scheme)
        q2 = QuantLinear(256, 64, scheme, bias=True, dtype=torch.bfloat16)
    assert (q.layout == "span") == bool(use_native)
    q2.set_stored(None, *q.stored(None))
    for (name, a), (_, b) in zip(q.named_buffers(), q2.named_buffers()):
        assert torch.equal(a, b), name


def test_quant_experts_match_dequantized_experts() -> None:
    torch.manual_seed(0)
    ex = Experts(4, 64, 64)
    nn.init.normal_(ex.gate_up_proj, std=0.05)
    nn.init.normal_(ex.down_proj, std=0.05)
    qx = QuantExperts.from_experts(ex, TensorScheme(4, 32))
    deq = Experts(4, 64, 64)
    with torch.no_grad():
        for e in range(4):
            deq.gate_up_proj[e] = qx.gate_up_proj.dequantize(e, torch.float32)
            deq.down_proj[e] = qx.down_proj.dequantize(e, torch.float32)
    x = torch.randn(5, 64)
    idx = torch.tensor([[0, 1], [1, 3], [2, 0], [3, 3], [0, 2]])
    w = torch.rand(5, 2)
    torch.testing.assert_close(qx(x, idx, w), deq(x, idx, w), rtol=1e-4, atol=1e-5)


def test_quantize_model_swaps_by_name_and_keeps_router_norms_embeddings() -> None:
    cfg = ModelConfig.from_name("tiny-moe")
    model = init_weights(ErnieForCausalLM(cfg), seed=0)
    ref = copy.deepcopy(model)
    quantize_model(model, QuantConfig.from_name("int2"))
    names = dict(qweights(model))
    assert isinstance(model.model.layers[1].mlp.experts, QuantExperts)
    assert names["model.layers.1.mlp.experts.gate_up_proj"].bits == 2
    assert names["model.layers.0.self_attn.q_proj"].bits == 4  # dense linears at 4 bits (mixed layout)
    assert names["lm_head"].bits == 8
    assert type(model.model.layers[1].mlp.gate).__name__ == "Router"
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    torch.testing.assert_close(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    assert model(x).logits.shape == ref(x).logits.shape
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int4")
    no_head = quantize_model(copy.deepcopy(ref), QuantConfig.from_name("int4", head_bits=None))
    assert type(no_head.lm_head) is Linear  # ours: nn.Linear with the native bf16 decode kernel


def test_forward_with_a_cache_object_uses_quantized_modules() -> None:
    """The engine path (cache.attend) runs the same quantized forward as the dense path."""
    cfg = ModelConfig.from_name("tiny-moe")
    model = quantize_model(init_weights(ErnieForCausalLM(cfg), seed=1), "int4").eval()

    class FullCache:  # plain attention over everything seen so far
        def __init__(self) -> None:
            self.k: dict[int, torch.Tensor] = {}
            self.v: dict[int, torch.Tensor] = {}

        def attend(self, i, q, k, v):  # noqa: ANN001, ANN202
            self.k[i] = torch.cat([self.k[i], k]) if i in self.k else k
            self.v[i] = torch.cat([self.v[i], v]) if i in self.v else v
            kk, vv = self.k[i], self.v[i]
            t, s = q.shape[0], kk.shape[0]
            mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None], attn_mask=mask,
                enable_gqa=True, scale=q.shape[-1] ** -0.5)
            return out[0].transpose(0, 1)

    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        full = model(ids).logits[0]
        cache = FullCache()
        first = model(ids[:, :6], position_ids=torch.arange(6), cache=cache).logits[0]
        steps = [model(ids[:, t:t + 1], position_ids=torch.tensor([t]), cache=cache).logits[0, -1]
                 for t in range(6, 10)]
    torch.testing.assert_close(first, full[:6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(steps), full[6:], rtol=1e-4, atol=1e-4)


def test_bad_options_are_clear() -> None:
    with pytest.raises(ValueError, match="quant='int3'"):
        QuantConfig.from_name("int3")
    with pytest.raises(ValueError, match="method='awq'"):
        QuantConfig.from_name("int4", method="awq")
    with pytest.raises(ValueError, match="group_size=12"):
        QuantConfig.from_name("int4", group_size=12)
    with pytest.raises(ValueError, match="groups of 96"):
        QuantLinear(160, 64, TensorScheme(4, 96))
    assert BASE[8].symmetric and QuantConfig.from_name("int8", group_size=64).experts.symmetric is False


def test_engine_generates_with_a_quantized_model() -> None:
    """The paged-KV engine runs the quantized model: greedy tokens equal a plain-forward greedy loop."""
    from ernie45.engine import LLMEngine, SamplingParams

    cfg = ModelConfig.from_name("tiny-moe")
    model = quantize_model(init_weights(ErnieForCausalLM(cfg), std=0.1, seed=2), "int4").eval()
    prompt = [5, 17, 99, 3, 250, 41]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].float().argmax()))
    eng = LLMEngine(model, max_num_seqs=2, kv_cache_memory="8MB", max_model_len=64)
    eng.add_request("a", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    out = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out = list(o.outputs[0].token_ids)
    assert out == ids[len(prompt):]


@pytest.mark.native
@pytest.mark.parametrize("scheme,down", [(TensorScheme(4, 128), None), (TensorScheme(8, None, True), None),
                                         (TensorScheme(2, 64), None), (TensorScheme(4, 32), None),
                                         (TensorScheme(6, 16, symmetric=True), None),
                                         (TensorScheme(4, 32), TensorScheme(6, 16, symmetric=True))],
                         ids=["int4-g128", "int8-channel", "int2-g64", "int4-g32", "int6-g16-sym", "q4_k-q6_k-down"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_native_experts_equal_the_per_expert_path(scheme: TensorScheme, down: TensorScheme | None,
                                                        dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """``kernels.qmoe`` (one call for all selected experts) against ``Experts.forward`` running each expert
    through the same span kernel: the same products and roundings, so equal up to silu's last bit. Also with the
    down stack in other bits (a GGUF Q4_K_M's Q6_K ffn_down_exps)."""
    torch.manual_seed(0)
    ex = Experts(8, 256, 256)
    nn.init.normal_(ex.gate_up_proj, std=0.08)
    nn.init.normal_(ex.down_proj, std=0.08)
    qx = native(QuantExperts.from_experts(ex, scheme, dtype, down_scheme=down))
    assert qx.gate_up_proj.layout == "span" and qx.down_proj.layout == "span"
    assert qx.down_proj.bits == (down or scheme).bits
    x = torch.randn(7, 256, dtype=dtype)
    idx = torch.tensor([[0, 3], [3, 1], [7, 0], [5, 5], [2, 6], [6, 2], [1, 4]])
    w = torch.rand(7, 2).to(dtype)
    calls, qmoe = [], kernels.qmoe
    monkeypatch.setattr(kernels, "qmoe", lambda *a: calls.append(a[3:]) or qmoe(*a))
    with torch.no_grad():
        fused = qx(x, idx, w)
        assert len(calls) == 1  # the one native call, not the per-expert fallback
        per_expert = Experts.forward(qx, x, idx, w)
    monkeypatch.undo()
    assert fused.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2e-2)
    torch.testing.assert_close(fused, per_expert, **tol)
    for t in (0, 3):  # a token alone gives the bits it gives in the batch
        assert torch.equal(qx(x[t:t + 1], idx[t:t + 1], w[t:t + 1]), fused[t:t + 1])
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.qmoe(x, torch.tensor([[9, 0]] * 7), w, qx.gate_up_proj.bits, kernel_args(qx.gate_up_proj),
                     kernel_args(qx.down_proj), qx.down_proj.bits)


@pytest.mark.native
def test_deepcopy_of_a_used_quantized_linear_reads_its_own_weights() -> None:
    """The span path caches raw pointers: a copy (or an unpickled module) must not read its original's memory."""
    q = native(QuantLinear.from_linear(nn.Linear(256, 64, bias=False), TensorScheme(4, 128)))
    x = torch.randn(2, 256)
    with torch.no_grad():
        before = q(x)  # the pointers are cached now
        twin = copy.deepcopy(q)
        other = native(QuantLinear.from_linear(nn.Linear(256, 64, bias=False), TensorScheme(4, 128)))
        q.set_stored(None, *other.stored(None))  # the original changes in place
        assert torch.equal(q(x), other(x))
        assert torch.equal(twin(x), before)  # the copy still computes with its own weights


@pytest.mark.native
@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_fused_linears_equal_the_separate_calls(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k/v (and gate/up) read the same x: one native call gives each linear's own result bit for bit, and the
    attention of a quantized model takes it at decode sizes."""
    torch.manual_seed(0)
    scheme = BASE[bits]
    mods = [native(QuantLinear.from_linear(nn.Linear(256, n, bias=False), scheme, torch.bfloat16))
            for n in (256, 64, 64)]
    x = torch.randn(3, 256).bfloat16()
    with torch.no_grad():
        fused = kernels.fused_linears(tuple(mods), x)
        assert fused is not None and [f.shape for f in fused] == [(3, 256), (3, 64), (3, 64)]
        for m, f in zip(mods, fused):
            assert torch.equal(f, m(x))
        other = native(QuantLinear.from_linear(nn.Linear(256, 64, bias=False), BASE[8 if bits != 8 else 4],
                                               torch.bfloat16))
        assert kernels.fused_linears((mods[0], other), x) is None  # different schemes: one by one
        assert kernels.fused_linears((mods[0], nn.Linear(256, 64)), x) is None
        assert kernels.fused_linears(tuple(mods), torch.randn(modules.KERNEL_MAX_ROWS + 1, 256).bfloat16()) is None
    cfg = ModelConfig.from_name("tiny-moe").replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=256)
    qc = QuantConfig.from_name("int4", dense_bits=6) if bits == 6 else QuantConfig.from_name(f"int{bits}")
    model = accelerate(quantize_model(init_weights(ErnieForCausalLM(cfg), seed=0).bfloat16(), qc), "cpu")
    calls = []
    real = kernels.fused_linears
    monkeypatch.setattr(kernels, "fused_linears", lambda m, x: calls.append(real(m, x) is not None) or real(m, x))
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    assert calls == [True] * 2 * cfg.num_hidden_layers  # q/k/v and gate/up (dense MLP or shared experts) per layer

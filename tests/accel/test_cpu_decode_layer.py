"""Native decode layers (``accel.cpu.decode_layer``): a quantized or bf16 model's decode steps with one C call per
layer against the module path (each op its own call), through the engine; when they apply, and when a cached plan is
rebuilt."""

from __future__ import annotations

import pytest
import torch

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights, kernels
from ernie45.accel import accelerate
from ernie45.accel.cpu.decode_layer import NativeDecoderLayer
from ernie45.engine import LLMEngine, SamplingParams
from ernie45.engine.model_runner import ModelRunner
from ernie45.quant import QuantConfig, TensorScheme, quantize_model
from ernie45.quant.scheme import Rule

pytestmark = pytest.mark.native  # run, fail when this machine could build them and did not, skip otherwise

# The smallest shapes every piece takes: spans of 256 columns (2- and 6-bit), head_dim a multiple of 16.
CFG = ModelConfig.from_name("tiny-moe").replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                                head_dim=64)
PROMPTS = [[5, 17, 99, 3], [250, 41, 7], [9, 8, 7, 6, 5, 4, 3]]


def _model(qc: QuantConfig | str | None, cfg: ModelConfig = CFG, seed: int = 0) -> ErnieForCausalLM:
    model = init_weights(ErnieForCausalLM(cfg), std=0.05, seed=seed).bfloat16().eval()
    return quantize_model(model, qc) if qc is not None else model


def _plans(model: ErnieForCausalLM) -> list:
    return [layer.native_plan() if isinstance(layer, NativeDecoderLayer) else None for layer in model.model.layers]


def _module_path(model: ErnieForCausalLM) -> ErnieForCausalLM:
    """The cpu backend without whole-layer calls: every piece native, one call each."""
    return accelerate(model, "cpu", decode_layers=False)


def _generate(model: ErnieForCausalLM, monkeypatch: pytest.MonkeyPatch, tokens: int = 8) -> tuple[dict, list, int]:
    """Greedy outputs by request, every step's logits, and the number of native layer calls (the engine keeps the
    backend applied to the model; the cpu one by default)."""
    logits, calls = [], []
    execute, decode_layer = ModelRunner.execute, kernels.decode_layer

    def record(self: ModelRunner, scheduled: list) -> tuple:
        seqs, out = execute(self, scheduled)
        logits.append(None if out is None else out.float().clone())
        return seqs, out

    monkeypatch.setattr(ModelRunner, "execute", record)
    monkeypatch.setattr(kernels, "decode_layer", lambda *a: calls.append(a[-1]) or decode_layer(*a))
    eng = LLMEngine(model, max_num_seqs=4, kv_cache_memory="8MB", max_model_len=64, enable_prefix_caching=False)
    for i, p in enumerate(PROMPTS):
        eng.add_request(str(i), p, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
    monkeypatch.undo()
    return outs, logits, len(calls)


# llama.cpp's Q4_K_M as a GGUF import keeps it (formats.gguf.gguf_quant_config): Q4_K (int4 g32) everywhere, Q6_K
# (6-bit g16) for the head and, in some layers, attn_v and ffn_down (routed and shared): a QSet of mixed bits (q/k/v)
# and experts whose down stack has other bits than gate_up.
Q6_K = TensorScheme(6, 16, symmetric=True)
Q4_K_M = QuantConfig(TensorScheme(4, 32), TensorScheme(4, 32), Q6_K, rules=(
    Rule("*.self_attn.v_proj", Q6_K, (1, 1)), Rule("*.mlp.experts.down_proj", Q6_K, (2, 2)),
    Rule("*.mlp.shared_experts.down_proj", Q6_K, (1, 2))))


@pytest.mark.parametrize("qc", ["int4", "int8", "int2", QuantConfig.from_name("int4", dense_bits=6), None, Q4_K_M],
                         ids=["int4", "int8", "int2", "int4-dense6", "bf16", "gguf-q4_k_m"])
def test_native_layers_match_the_module_path(qc: QuantConfig | str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three sequences decoding together (T = 3 rows), a dense layer and MoE layers with a shared expert: the same
    tokens, logits within a bf16 rounding of the activations, and every decode step's layers went native."""
    model = _model(qc)
    fast, fast_logits, calls = _generate(model, monkeypatch)
    assert model.accel_backend == "cpu"
    ref, ref_logits, ref_calls = _generate(_module_path(model), monkeypatch)
    assert ref_calls == 0 and fast == ref
    decode_steps = sum(1 for lg in ref_logits if lg is not None) - 1  # the first step is the prefill
    assert calls == decode_steps * CFG.num_hidden_layers and decode_steps >= 7
    for a, b in zip(fast_logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * float(b.abs().max()))


def test_moe_without_shared_experts_and_one_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CFG.replace(moe_num_shared_experts=0)
    model = _model("int4", cfg)
    fast, fast_logits, calls = _generate(model, monkeypatch, tokens=5)
    ref, ref_logits, _ = _generate(_module_path(model), monkeypatch, tokens=5)
    assert fast == ref and calls > 0
    for a, b in zip(fast_logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * float(b.abs().max()))


@pytest.mark.parametrize("case", ["fp32 model", "biases", "odd head_dim"])
def test_layers_without_a_native_form_take_the_module_path(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No plan, no native call, and the engine still generates (the plan is None, not an error)."""
    if case == "fp32 model":
        model = _model(None).float()
    elif case == "biases":
        model = _model("int4", CFG.replace(use_bias=True))
    else:  # o_proj's 4 * 48 = 192 input columns do not fill the 4-bit spans of 128
        model = _model(QuantConfig.from_name("int4", group_size=64), CFG.replace(head_dim=48))
    assert all(p is None for p in _plans(accelerate(model, "cpu")))
    outs, _, calls = _generate(model, monkeypatch, tokens=3)
    assert calls == 0 and len(outs) == len(PROMPTS)


def test_a_plan_follows_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built for the model as it is now, without torch-global hooks: bf16 ones before quantization, quantized ones
    after ``quantize_model`` swapped the accelerated layers' modules; rebuilt when a weight is requantized in place
    (its zeros and pointers change), dropped when the model goes to fp32."""
    model = accelerate(_model(None), "cpu")
    bf16 = _plans(model)
    assert all(p is not None and p.qkv.bits == 16 for p in bf16)
    quantize_model(model, "int4")
    plans = _plans(model)
    assert all(p is not None and p.qkv.bits == 4 for p in plans) and _plans(model)[0] is plans[0]  # cached
    accelerate(model, "cpu")  # the new quantized modules' own native forms (prefill rows) for the comparison below
    plans = _plans(model)
    q = model.model.layers[0].self_attn.q_proj
    q.quantize_(None, torch.randn(q.n, q.k, generator=torch.Generator().manual_seed(0)) * 0.05)
    assert _plans(model)[0] is not plans[0]
    fast, _, calls = _generate(model, monkeypatch, tokens=3)
    ref, _, _ = _generate(_module_path(model), monkeypatch, tokens=3)
    assert calls > 0 and fast == ref
    accelerate(model, "cpu")
    model.float()
    assert _plans(model) == [None] * CFG.num_hidden_layers
    _, _, calls = _generate(model, monkeypatch, tokens=2)
    assert calls == 0


def test_bad_cache_arguments_are_rejected_by_name() -> None:
    """A slot outside the cache is an error naming the layer, not a write past the end of the cache."""
    model = accelerate(_model("int4"), "cpu")
    plan = _plans(model)[0]
    kc = torch.zeros(2, 16, CFG.num_key_value_heads, CFG.head_dim, dtype=torch.bfloat16)
    vc = kc.clone()
    step = kernels.DecodeStep(torch.tensor([32]), torch.tensor([[0, 1]]), torch.tensor([5]), 32, 16, [kc.data_ptr()],
                              [vc.data_ptr()])
    h = torch.randn(1, CFG.hidden_size).bfloat16()
    cos = torch.ones(1, CFG.head_dim // 2)
    with pytest.raises(RuntimeError, match=r"layer 0\).*outside the cache"):
        kernels.decode_layer(plan, h, cos, cos, step, 0)


def test_hooks_and_subclasses_keep_the_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward hook must see its module's calls, and a subclass may change the forward (an all-reduce, LoRA):
    such layers run their modules; the others stay native."""
    from ernie45.quant import QuantLinear

    model = accelerate(_model("int4"), "cpu")
    seen = []
    handle = model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    plans = _plans(model)
    assert plans[1] is None and plans[0] is not None and plans[2] is not None
    _, _, calls = _generate(model, monkeypatch, tokens=3)
    assert seen and calls > 0  # the hooked layer ran its modules at every step, the others natively
    handle.remove()
    assert _plans(model)[1] is not None

    class Custom(QuantLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    mlp = model.model.layers[0].mlp
    custom = Custom(mlp.down_proj.in_features, mlp.down_proj.out_features, mlp.down_proj.scheme)
    custom.load_state_dict(mlp.down_proj.state_dict())
    mlp.down_proj = custom
    assert _plans(model)[0] is None

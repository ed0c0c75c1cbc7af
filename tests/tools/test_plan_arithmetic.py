"""The planner's figures against hand computation and against published GPU counts.

Hand figures are written out from the architecture (spec §1, §3.1), not from the planner's own tensor list.
"""

from __future__ import annotations

import math

import pytest
import torch

from ernie45 import ErnieForCausalLM, ModelConfig
from ernie45.tools import Parallel, catalogue, parse_weight_format, plan_memory, tensor_inventory, weight_bytes
from ernie45.tools.hardware import CATALOGUE, GiB, host_memory_bytes

PRESETS = ["ernie-4.5-0.3b", "ernie-4.5-21b-a3b", "ernie-4.5-300b-a47b"]
V = 103424


def _fits(plan) -> dict[str, int | None]:
    return {f.device: f.min_gpus for f in plan.fits}


# ------------------------------------------------------------------------------------ tensor list
@pytest.mark.parametrize("name", [*PRESETS, "tiny-moe", "tiny-dense"])
@pytest.mark.parametrize("mtp", [False, True])
def test_inventory_is_the_native_state_dict(name, mtp):
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg if mtp else cfg.replace(num_nextn_predict_layers=0))
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")  # the same tensor as the embedding
    got = {s.name: s.shape for s in tensor_inventory(cfg, mtp=mtp)}
    assert got == expected
    assert sum(s.numel for s in tensor_inventory(cfg, mtp=mtp)) == cfg.num_params(include_mtp=mtp)


def test_inventory_with_biases_matches_the_model():
    cfg = ModelConfig.from_name("tiny-moe").replace(use_bias=True)
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items() if k != "lm_head.weight"}
    assert {s.name: s.shape for s in tensor_inventory(cfg)} == expected


# ------------------------------------------------------------------------------------ hand figures
def _parts_300b() -> dict[str, int]:
    h, i_dense, i_exp, e = 8192, 28672, 3584, 64
    return {
        "attn": 54 * (8192 * h * 2 + 1024 * h * 2),          # q, o: [8192, 8192]; k, v: [1024, 8192]
        "attn_rows": 54 * (8192 + 1024 + 1024 + 8192),
        "dense": 3 * 3 * i_dense * h,                         # layers 0-2
        "dense_rows": 3 * (2 * i_dense + h),
        "experts": 51 * e * 3 * i_exp * h,                    # layers 3-53
        "expert_rows": 51 * e * (2 * i_exp + h),
        "embed_head": 2 * V * h,                              # untied
        "norms": 54 * 2 * h + h,
        "router": 51 * (e * h + e),                           # fp32 weight + correction bias
    }


def test_300b_parameter_count_by_hand():
    p = _parts_300b()
    cfg = ModelConfig.from_name("ernie-4.5-300b-a47b")
    n = p["attn"] + p["dense"] + p["experts"] + p["embed_head"] + p["norms"] + p["router"]
    assert n == cfg.num_params() == 299_484_163_264  # spec §1.1: "about 299B"


@pytest.mark.parametrize("fmt,bits", [("bf16", 16), ("wint8", 8), ("wint4", 4)])
def test_300b_weights_by_hand(fmt, bits):
    p = _parts_300b()
    linear = p["attn"] + p["dense"] + p["experts"]
    if fmt == "bf16":
        expected = 2 * (linear + p["embed_head"] + p["norms"]) + 4 * p["router"]
    else:  # packed codes + one bf16 scale per output row; embeddings, head, norms bf16; router fp32
        rows = p["attn_rows"] + p["dense_rows"] + p["expert_rows"]
        expected = linear * bits // 8 + 2 * rows + 2 * (p["embed_head"] + p["norms"]) + 4 * p["router"]
    got = weight_bytes(ModelConfig.from_name("ernie-4.5-300b-a47b"), parse_weight_format(fmt))
    assert got.total_bytes == expected


def _parts_21b() -> dict[str, int]:
    h, e, w = 2560, 64, 1536
    return {
        "attn": 28 * (2560 * h * 2 + 512 * h * 2),
        "attn_rows": 28 * (2560 + 512 + 512 + 2560),
        "dense": 3 * 12288 * h + 27 * 3 * 3072 * h,            # layer 0 dense; 27 shared experts of 2 x 1536
        "dense_rows": (2 * 12288 + h) + 27 * (2 * 3072 + h),
        "experts": 27 * e * 3 * w * h,
        "expert_rows": 27 * e * (2 * w + h),
        "embed_head": V * h,                                  # tied
        "norms": 28 * 2 * h + h,
        "router": 27 * (e * h + e),
    }


def _parts_03b() -> dict[str, int]:
    h = 1024
    return {
        "attn": 18 * (2048 * h * 2 + 256 * h * 2),              # head_dim 128: q/o are 2048 wide
        "attn_rows": 18 * (2048 + 256 + 256 + 1024),
        "dense": 18 * 3 * 3072 * h,
        "dense_rows": 18 * (2 * 3072 + h),
        "experts": 0, "expert_rows": 0,
        "embed_head": V * h,                                  # tied
        "norms": 18 * 2 * h + h,
        "router": 0,
    }


@pytest.mark.parametrize("name,parts", [("ernie-4.5-0.3b", _parts_03b), ("ernie-4.5-21b-a3b", _parts_21b),
                                        ("ernie-4.5-300b-a47b", _parts_300b)])
@pytest.mark.parametrize("fmt,bits", [("fp32", 32), ("bf16", 16), ("fp8", 8), ("wint8", 8), ("wint4", 4)])
def test_three_configs_weights_by_hand(name, parts, fmt, bits):
    p = parts()
    cfg = ModelConfig.from_name(name)
    linear = p["attn"] + p["dense"] + p["experts"]
    rest = p["embed_head"] + p["norms"]
    assert linear + rest + p["router"] == cfg.num_params()
    if fmt in ("fp32", "bf16"):
        expected = bits // 8 * (linear + rest) + 4 * p["router"]
    elif fmt == "fp8":  # one fp32 scale per 128 x 128 block; every matrix here is a multiple of 128
        expected = linear + 4 * linear // (128 * 128) + 2 * rest + 4 * p["router"]
    else:
        rows = p["attn_rows"] + p["dense_rows"] + p["expert_rows"]
        expected = linear * bits // 8 + 2 * rows + 2 * rest + 4 * p["router"]
    assert weight_bytes(cfg, parse_weight_format(fmt)).total_bytes == expected


def test_wint2_300b_by_hand_and_against_baidus_89gb():
    p = _parts_300b()
    h, e, i_exp = 8192, 64, 3584
    per_layer_experts, per_layer_rows = e * 3 * i_exp * h, e * (2 * i_exp + h)
    int8 = p["attn"] + p["dense"] + 2 * (p["attn_rows"] + p["dense_rows"])
    int4 = 4 * (per_layer_experts // 2 + 2 * per_layer_rows)  # MoE layers 3-6 (FastDeploy: layers 0-6)
    # CCQ 2-bit: 4 weights per byte, a 4-bit local scale per 64 inputs, 10 bytes per output row.
    gate_up = 2 * i_exp * (h // 4 + h // 64 // 2 + 10)
    down = h * (i_exp // 4 + i_exp // 64 // 2 + 10)
    ccq = 47 * e * (gate_up + down)
    expected = int8 + int4 + ccq + 2 * (p["embed_head"] + p["norms"]) + 4 * p["router"]
    got = weight_bytes(ModelConfig.from_name("ernie-4.5-300b-a47b"), parse_weight_format("wint2")).total_bytes
    assert got == expected
    # Baidu: the CCQ checkpoint is 89 GB. Ours is 93.8e9 bytes = 87.4 GiB: within 6% whichever unit
    # "GB" means; the rest is what the published figure leaves unstated (MTP, rounding of the card).
    assert abs(got / 89e9 - 1) < 0.06 and abs(got / (89 * GiB) - 1) < 0.06


def test_kv_bytes_per_token_by_hand():
    assert ModelConfig.from_name("ernie-4.5-300b-a47b").kv_bytes_per_token(2) == 2 * 54 * 8 * 128 * 2 == 221_184
    assert ModelConfig.from_name("ernie-4.5-21b-a3b").kv_bytes_per_token(2) == 2 * 28 * 4 * 128 * 2 == 57_344
    assert ModelConfig.from_name("ernie-4.5-0.3b").kv_bytes_per_token(2) == 2 * 18 * 2 * 128 * 2 == 18_432


def test_kv_cache_300b_131k_and_its_shards():
    one = plan_memory("ernie-4.5-300b-a47b", weights="wint4", context=131072, batch=1, devices=[])
    assert one.kv_bytes_per_token == 221_184
    assert one.kv_cache_bytes == 221_184 * 131072 == 28_991_029_248  # DESIGN.md: 29 GB per sequence
    tp8 = plan_memory("ernie-4.5-300b-a47b", weights="wint4", context=131072, batch=1, tp=8, devices=[])
    assert tp8.kv_cache_bytes == one.kv_cache_bytes // 8  # one KV head per GPU
    tp16 = plan_memory("ernie-4.5-300b-a47b", weights="wint4", context=131072, batch=1, tp=16, devices=[])
    assert tp16.kv_cache_bytes == tp8.kv_cache_bytes  # 8 KV heads over 16 GPUs: replicated, not halved
    pp2 = plan_memory("ernie-4.5-300b-a47b", weights="wint4", context=131072, batch=1, pp=2, devices=[])
    assert pp2.kv_cache_bytes == one.kv_cache_bytes // 2  # 27 of 54 layers per stage
    fp8 = plan_memory("ernie-4.5-300b-a47b", weights="wint4", kv_dtype="fp8", context=131072, batch=3, devices=[])
    assert fp8.kv_cache_bytes == 3 * 131072 * 221_184 // 2
    paged = plan_memory("ernie-4.5-0.3b", context=1000, batch=2, block_size=16, devices=[])
    assert paged.kv_cache_bytes == 2 * 1008 * 18_432  # each sequence rounds up to whole 16-token pages


@pytest.mark.parametrize("name", PRESETS)
def test_every_format_orders_and_scales_with_bits(name):
    cfg = ModelConfig.from_name(name)
    sizes = {f: weight_bytes(cfg, parse_weight_format(f)).total_bytes
             for f in ("fp32", "bf16", "fp8", "wint8", "wint4", "int8", "int4", "int2")}
    assert sizes["fp32"] > sizes["bf16"] > sizes["wint8"] > sizes["wint4"]
    assert sizes["int8"] > sizes["int4"] >= sizes["int2"]  # int2 differs only in the experts
    assert (sizes["int4"] > sizes["int2"]) == cfg.is_moe
    # fp32 is exactly twice bf16 except the router, which is fp32 in both.
    router = sum(s.numel for s in tensor_inventory(cfg) if s.kind == "router")
    assert sizes["fp32"] - 4 * router == 2 * (sizes["bf16"] - 4 * router)


def test_tied_head_quantized_becomes_its_own_tensor():
    cfg = ModelConfig.from_name("ernie-4.5-0.3b")  # tied
    int8 = parse_weight_format("int8")
    with_head = weight_bytes(cfg, int8).total_bytes
    without = weight_bytes(cfg, int8, quantize_head=False).total_bytes
    assert with_head - without == V * 1024 + 2 * V  # int8 codes + one bf16 scale per vocab row


# ------------------------------------------------------------------------------------ parallel
def test_tensor_parallel_splits_weights():
    cfg = ModelConfig.from_name("ernie-4.5-300b-a47b")
    fmt = parse_weight_format("bf16")
    one = weight_bytes(cfg, fmt)
    tp8 = weight_bytes(cfg, fmt, Parallel(tp=8))
    replicated = sum(2 * s.numel for s in tensor_inventory(cfg) if s.kind == "norm") + \
        sum(4 * s.numel for s in tensor_inventory(cfg) if s.kind == "router")
    assert tp8.per_gpu_bytes == (one.total_bytes - replicated) // 8 + replicated
    ep8 = weight_bytes(cfg, fmt, Parallel(tp=1, ep=8))
    experts = sum(2 * s.numel for s in tensor_inventory(cfg) if s.kind == "experts")
    # ep=8: an eighth of the experts (whole ones), everything else whole on every rank (ernie45.parallel)
    assert ep8.per_gpu_bytes == one.total_bytes - experts + experts // 8
    tp2ep4 = weight_bytes(cfg, fmt, Parallel(tp=2, ep=4))
    assert tp2ep4.per_gpu_bytes == (one.total_bytes - experts - replicated) // 2 + replicated + experts // 8
    pp2 = weight_bytes(cfg, fmt, Parallel(pp=2))
    assert sum(pp2.stage_bytes) == one.total_bytes and pp2.per_gpu_bytes == max(pp2.stage_bytes)


def test_expert_parallel_repeats_attention_and_kv():
    kw = dict(weights="wint4", context=8192, batch=8, devices=[])
    one = plan_memory("ernie-4.5-300b-a47b", **kw)
    ep8 = plan_memory("ernie-4.5-300b-a47b", ep=8, **kw)
    tp2ep4 = plan_memory("ernie-4.5-300b-a47b", tp=2, ep=4, **kw)
    assert ep8.parallel["gpus"] == 8 and tp2ep4.parallel["gpus"] == 8
    assert ep8.kv_cache_bytes == one.kv_cache_bytes  # every ep rank sees every token
    assert tp2ep4.kv_cache_bytes == one.kv_cache_bytes // 2


@pytest.mark.parametrize("kw,word", [({"tp": 3}, "tp=3"), ({"ep": 3}, "ep=3"), ({"pp": 99}, "pp=99"),
                                     ({"tp": 128}, "tp=128"),
                                     ({"context": 0}, "context"), ({"weights": "int5"}, "int5"),
                                     ({"kv_dtype": "int4"}, "kv-dtype"), ({"context": 10**6}, "max_position"),
                                     ({"mode": "full", "weights": "wint4"}, "lora"), ({"batch_size": 2}, "unknown")])
def test_bad_requests_name_the_problem(kw, word):
    with pytest.raises(ValueError, match=word):
        plan_memory("ernie-4.5-300b-a47b", devices=[], **kw)


def test_ep_on_dense_model_is_refused():
    with pytest.raises(ValueError, match="Mixture-of-Experts"):
        plan_memory("ernie-4.5-0.3b", ep=2, devices=[])


# ------------------------------------------------------------------------------------ published counts
@pytest.mark.parametrize("context", [8192, 32768, 131072])
def test_fastdeploy_minimum_gpus_for_300b_on_80gb(context):
    """FastDeploy's best-practice table (spec §5, PEERS.md §2): 300B on 80 GB GPUs needs WINT8 8,
    WINT4 4, WINT2 2, FP8 8 (H800). Power-of-two counts (tensor parallel)."""
    expected = {"wint8": 8, "wint4": 4, "wint2": 2, "fp8": 8}
    for fmt, n in expected.items():
        plan = plan_memory("ernie-4.5-300b-a47b", weights=fmt, context=context, batch=1)
        assert _fits(plan)["h100"] == n, fmt
        assert _fits(plan)["a100-80"] == n, fmt


@pytest.mark.parametrize("context", [32768, 131072])
def test_bf16_300b_needs_16_80gb_gpus(context):
    """FastDeploy#2649 and vLLM's recipe: the 300B in BF16 takes 16 x 80 GB."""
    plan = plan_memory("ernie-4.5-300b-a47b", weights="bf16", context=context, batch=1)
    assert _fits(plan)["h100"] == 16 and _fits(plan)["a100-80"] == 16


def test_bf16_300b_at_8k_is_where_we_differ():
    """Where ours differs from the published 16: at an 8K context with one sequence, the weights alone
    are 69.7 GiB of the 72.0 GiB an A100-80 gives at 0.9 utilization (71.7 on an H100, which reports
    81559 MiB), so the arithmetic squeezes the model onto 8 A100s with 0.3 GiB to spare. FastDeploy and
    vLLM also reserve CUDA-graph and sampler memory and size the cache for max_num_seqs sequences, so
    in practice that is 16; the planner answers for exactly the context and batch it is given."""
    plan = plan_memory("ernie-4.5-300b-a47b", weights="bf16", context=8192, batch=1)
    a100 = next(f for f in plan.fits if f.device == "a100-80")
    assert a100.min_gpus == 8 and a100.usable_bytes - a100.per_gpu_total_bytes < 0.5 * GiB
    assert _fits(plan)["h100"] == 16
    assert _fits(plan_memory("ernie-4.5-300b-a47b", weights="bf16", context=8192, batch=4))["a100-80"] == 16


@pytest.mark.parametrize("context", [32768, 131072])
def test_2bit_300b_fits_one_141gb_gpu(context):
    plan = plan_memory("ernie-4.5-300b-a47b", weights="wint2", context=context, batch=1)
    fits = {f.device: f for f in plan.fits}
    assert fits["h200"].fits_as_configured and fits["h200"].min_gpus == 1
    assert fits["h20-141"].min_gpus == 1
    assert fits["h20"].min_gpus == 2  # 96 GB: the 87 GiB of weights leave too little for anything else
    assert plan.total_bytes <= 141 * GiB * 0.9


def test_21b_int4_fits_a_24gb_card_and_this_machine_shape():
    plan = plan_memory("ernie-4.5-21b-a3b", weights="wint4", context=8192, batch=1)
    assert _fits(plan)["rtx4090"] == 1
    bf16 = plan_memory("ernie-4.5-21b-a3b", weights="bf16", context=8192, batch=1)
    assert _fits(bf16)["rtx4090"] == 4 and _fits(bf16)["h100"] == 1


# ------------------------------------------------------------------------------------ training
def test_full_finetune_state_by_hand():
    cfg = ModelConfig.from_name("ernie-4.5-0.3b")
    n = cfg.num_params()
    plan = plan_memory(cfg, mode="full", weights="bf16", context=1024, batch=1, devices=[])
    assert plan.weights_bytes == 2 * n and plan.gradient_bytes == 2 * n
    assert plan.optimizer_bytes == n * (8 + 4)  # AdamW moments + fp32 master weights
    assert plan.kv_cache_bytes == 0
    sgd = plan_memory(cfg, mode="full", weights="fp32", optimizer="sgd", context=1024, batch=1, devices=[])
    assert sgd.optimizer_bytes == 4 * n  # momentum only; fp32 weights need no master copy


def test_lora_trainable_params_by_hand():
    cfg = ModelConfig.from_name("ernie-4.5-0.3b")
    r = 8
    per_layer = r * ((1024 + 2048) * 2 + (1024 + 256) * 2 + (1024 + 3072) * 3)  # q, o, k, v, gate, up, down
    plan = plan_memory(cfg, mode="lora", lora_rank=r, weights="wint4", context=2048, batch=2, devices=[])
    assert plan.trainable_params == 18 * per_layer
    assert plan.gradient_bytes == 4 * 18 * per_layer and plan.optimizer_bytes == 12 * 18 * per_layer
    moe = ModelConfig.from_name("tiny-moe")  # H 64, q 64 / kv 32 wide, dense I 128, 8 experts of 32, shared 32
    attn = (64 + 64) * 2 + (64 + 32) * 2
    expected = 3 * attn + 3 * (64 + 128) + 2 * (3 * (64 + 32) + 8 * ((64 + 64) + (32 + 64)))
    assert plan_memory(moe, mode="lora", lora_rank=1, devices=[]).trainable_params == expected
    from ernie45.train.lora import LoRAConfig, apply_lora

    model = apply_lora(ErnieForCausalLM(moe.replace(num_nextn_predict_layers=0)), LoRAConfig(r=1))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected  # the trainer agrees
    full = plan_memory(cfg, mode="full", context=2048, batch=2, devices=[])
    ckpt_off = plan_memory(cfg, mode="full", context=2048, batch=2, gradient_checkpointing=False, devices=[])
    assert ckpt_off.activation_bytes > full.activation_bytes > 2048 * 2 * V * 4  # logits dominate


# ------------------------------------------------------------------------------------ catalogue
def test_catalogue_has_the_listed_gpus_and_this_machine():
    names = " ".join(d.name for d in CATALOGUE)
    for gpu in ("H200 141", "H100 80", "H20 96", "H20 141", "A100 80", "A100 40", "L40S 48", "RTX 4090 24"):
        assert gpu in names
    host = catalogue()[-1]
    assert host.kind == "cpu" and host.memory_bytes == host_memory_bytes()
    with open("/proc/meminfo") as f:
        kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    assert host.memory_bytes == kib * 1024


def test_host_ram_fit_is_one_process():
    plan = plan_memory("ernie-4.5-0.3b", weights="bf16", context=4096, batch=1)
    host = next(f for f in plan.fits if f.device == "cpu")
    assert host.min_gpus == 1 and host.fits_as_configured
    big = plan_memory("ernie-4.5-300b-a47b", weights="bf16", context=4096, batch=1)
    assert next(f for f in big.fits if f.device == "cpu").min_gpus is None


def test_activations_grow_with_chunk_and_logits():
    small = plan_memory("ernie-4.5-21b-a3b", context=512, batch=1, devices=[])
    big = plan_memory("ernie-4.5-21b-a3b", context=65536, batch=1, devices=[])  # chunks of 2048 (engine default)
    wide = plan_memory("ernie-4.5-21b-a3b", context=65536, batch=1, prefill_chunk=8192, devices=[])
    assert small.activation_bytes < big.activation_bytes < wide.activation_bytes
    assert wide.activation_bytes == 4 * big.activation_bytes  # linear in the chunk's tokens
    # decode of 256 sequences: at least their logits, bf16 plus an fp32 copy
    many = plan_memory("ernie-4.5-21b-a3b", context=16, batch=256, devices=[])
    assert many.activation_bytes >= 256 * V * 6
    assert math.isclose(big.activation_bytes, plan_memory("ernie-4.5-21b-a3b", context=65536, batch=4,
                                                          devices=[]).activation_bytes)  # chunk-bound

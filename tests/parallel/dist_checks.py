"""Checks that run inside every rank (see launcher.py). Each rank builds the same seeded model, computes
the single-process reference itself, then the parallel result, and compares."""

from __future__ import annotations

import copy

import pytest
import torch

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights, load_model
from ernie45.parallel import MeshError, ParallelConfig, init_mesh, parallelize
from ernie45.parallel.fsdp import apply_fsdp, train_step
from ernie45.parallel.shard import collect_specs
from ernie45.parallel.sharded_load import local_nbytes, sharded_load

TINY_MOE = ModelConfig.from_name("tiny-moe")
TINY_DENSE = ModelConfig.from_name("tiny-dense")
TP_CONFIGS = {
    # kv heads split (2 over 2), biases, untied head, vocab-parallel
    "dense-bias-untied": TINY_DENSE.replace(use_bias=True, tie_word_embeddings=False),
    # one kv head replicated on both ranks, tied vocab-parallel head, shared expert, experts split by width
    "moe-kv1-tied": TINY_MOE.replace(num_key_value_heads=1),
    # vocab 513 is odd: embedding and head stay replicated; no shared expert; MoE head bias
    "moe-oddvocab-bias": TINY_MOE.replace(vocab_size=513, moe_num_shared_experts=0, use_bias=True,
                                          tie_word_embeddings=False),
}
EP_CONFIGS = {
    "moe-shared": TINY_MOE,
    "moe-noshared-interval": TINY_MOE.replace(moe_num_shared_experts=0, num_hidden_layers=4, moe_layer_start_index=0,
                                              moe_layer_interval=2, moe_num_experts=16, moe_k=4),
}


def build(cfg: ModelConfig, seed: int = 0) -> ErnieForCausalLM:
    # std 0.1: logits of order 1-10, so a wrong shard cannot hide under the tolerance
    return init_weights(ErnieForCausalLM(cfg), std=0.1, seed=seed).eval()


def ids_for(cfg: ModelConfig, b: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def assert_logits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max().item()
    assert scale > 0.5, f"reference logits too small to be informative ({scale})"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5 * scale)


def greedy(model: ErnieForCausalLM, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding by re-running the full sequence each step (the engine-free reference)."""
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def compare_forward(sizes: ParallelConfig, configs: dict[str, ModelConfig], gen_tokens: int = 0) -> None:
    for name, cfg in configs.items():
        ref = build(cfg)
        par = parallelize(copy.deepcopy(ref), init_mesh(sizes, cfg))
        ids = ids_for(cfg)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding: the masked SDPA path under tp
        with torch.no_grad():
            for kwargs in ({}, {"attention_mask": mask}):
                assert_logits_equal(par(ids, **kwargs).logits, ref(ids, **kwargs).logits)
            one = ids[:1, :1]  # one token: fewer tokens than ep ranks
            assert_logits_equal(par(one).logits, ref(one).logits)
        if gen_tokens:
            want = greedy(ref, ids[:1, :5], gen_tokens)
            assert greedy(par, ids[:1, :5], gen_tokens) == want, name


# -------------------------------------------------------------------------------------- 2 ranks
def tp2_logits(rank: int, world: int) -> None:
    compare_forward(ParallelConfig(tp=2), TP_CONFIGS, gen_tokens=8)


def ep2_logits(rank: int, world: int) -> None:
    compare_forward(ParallelConfig(ep=2), EP_CONFIGS, gen_tokens=8)


def shards_differ(rank: int, world: int) -> None:
    """The parallel model really is split: local sizes add up to the full model, not twice it."""
    cfg = TINY_MOE
    par = parallelize(build(cfg), init_mesh(ParallelConfig(ep=2), cfg))
    experts = par.model.layers[1].mlp.experts
    assert experts.gate_up_proj.shape == (4, 64, 64) and experts.expert_start == 4 * rank
    full = build(cfg).model.layers[1].mlp.experts.gate_up_proj
    torch.testing.assert_close(experts.gate_up_proj, full[4 * rank:4 * rank + 4], rtol=0, atol=0)
    tp = parallelize(build(cfg), init_mesh(ParallelConfig(tp=2), cfg))
    assert tp.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    assert tp.model.embed_tokens.weight.shape == (256, 64) and tp.lm_head.weight is tp.model.embed_tokens.weight


def mesh_world_mismatch(rank: int, world: int) -> None:
    with pytest.raises(MeshError, match="world size 2 != dp\\(1\\) x ep\\(1\\) x tp\\(4\\)"):
        init_mesh(ParallelConfig(tp=4), TINY_DENSE)


def _train_batch(cfg: ModelConfig, b: int = 4, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    ids = ids_for(cfg, b=b, t=t + 1, seed=7)
    labels = ids[:, 1:].clone()
    labels[0, :4] = -100  # unequal valid-token counts per rank
    return ids[:, :-1].contiguous(), labels


def _reference_training(cfg: ModelConfig, steps: int, lr: float, clip: float | None = None
                        ) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = build(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ids, labels = _train_batch(cfg)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            assert norm > 2 * clip, "clipping is not active: the check would not test it"
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _rows(ids: torch.Tensor, labels: torch.Tensor, mesh) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """This data rank's slice of the global batch."""
    data_rank = mesh.local_rank("dp") * mesh.ep + mesh.local_rank("ep")
    per = ids.shape[0] // (mesh.dp * mesh.ep)
    rows = slice(data_rank * per, (data_rank + 1) * per)
    return ids[rows], labels[rows]


def _parallel_trainer(sizes: ParallelConfig, cfg: ModelConfig, fsdp: bool, lr: float):  # noqa: ANN202
    mesh = init_mesh(sizes, cfg)
    model = parallelize(build(cfg).train(), mesh, tokens="sharded")
    specs = collect_specs(model)
    if fsdp:
        apply_fsdp(model, mesh)
    return mesh, model, specs, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def assert_params_equal(model: ErnieForCausalLM, specs: dict, want_params: dict, cfg: ModelConfig, lr: float) -> None:
    # full_tensor() is a collective: gather everything before any assertion can stop one rank early
    got = {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for n, p in model.named_parameters()}
    init = build(cfg)
    moved = 0
    for name, local in got.items():
        want, start = want_params[name], init.get_parameter(name).detach()
        if name in specs:
            want, start = specs[name].take(want), specs[name].take(start)
        # AdamW divides by sqrt(v): a gradient near zero whose last bit differs moves a weight by up to lr,
        # so the absolute tolerance is a fraction of one step (lr), far below the 3-step movement.
        torch.testing.assert_close(local, want, rtol=1e-4, atol=1e-2 * lr, msg=lambda m, n=name: f"{n}: {m}")
        moved += int((local - start).abs().max().item() > 10 * lr * 1e-2)
    assert moved == len(got), f"only {moved} of {len(got)} parameters moved"


def compare_training(sizes: ParallelConfig, cfg: ModelConfig, fsdp: bool, steps: int = 3, lr: float = 1e-2,
                     clip: float | None = None) -> None:
    want_losses, want_params = _reference_training(cfg, steps, lr, clip)
    mesh, model, specs, opt = _parallel_trainer(sizes, cfg, fsdp, lr)
    ids, labels = _rows(*_train_batch(cfg), mesh)
    losses = [train_step(model, opt, ids, labels, mesh, max_grad_norm=clip) for _ in range(steps)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=1e-6)
    assert want_losses[-1] < want_losses[0] - 0.05, "training did not move the loss: the check is not informative"
    assert_params_equal(model, specs, want_params, cfg, lr)


def dcp_save_ep2(rank: int, world: int, folder: str) -> None:
    """Two steps on ep=2 + FSDP, then a DCP checkpoint (resumed on 4 ranks and exported by the parent)."""
    from ernie45.parallel.dist_checkpoint import save_train_checkpoint

    mesh, model, _, opt = _parallel_trainer(ParallelConfig(ep=2), TINY_MOE, True, 1e-2)
    ids, labels = _rows(*_train_batch(TINY_MOE), mesh)
    for _ in range(2):
        train_step(model, opt, ids, labels, mesh)
    save_train_checkpoint(folder, model, opt, mesh, step=2)


def dcp_resume_dp2_ep2(rank: int, world: int, folder: str) -> None:
    """The 2-rank checkpoint resumed on dp=2 x ep=2: step 3 equals single-process step 3."""
    from ernie45.parallel.dist_checkpoint import load_train_checkpoint

    lr = 1e-2
    want_losses, want_params = _reference_training(TINY_MOE, 3, lr)
    mesh, model, specs, opt = _parallel_trainer(ParallelConfig(dp=2, ep=2), TINY_MOE, True, lr)
    assert load_train_checkpoint(folder, model, opt, mesh) == 2
    loss = train_step(model, opt, *_rows(*_train_batch(TINY_MOE), mesh), mesh)
    assert abs(loss - want_losses[2]) <= 1e-5 * want_losses[2], (loss, want_losses)
    assert_params_equal(model, specs, want_params, TINY_MOE, lr)


def ep2_training(rank: int, world: int) -> None:
    compare_training(ParallelConfig(ep=2), TINY_MOE, fsdp=False)


def ep2_fsdp_training(rank: int, world: int) -> None:
    compare_training(ParallelConfig(ep=2), TINY_MOE, fsdp=True, clip=0.05)  # global-norm clipping active


def dp2_fsdp_dense_training(rank: int, world: int) -> None:
    compare_training(ParallelConfig(dp=2), TINY_DENSE, fsdp=True)


def peak_rss() -> int:
    """VmHWM: this process's peak RSS in bytes. (getrusage's ru_maxrss survives exec, so a spawned rank
    would inherit its parent's peak; VmHWM belongs to the process image and starts fresh.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def sharded_load_memory(rank: int, world: int, path: str, full_bytes: int) -> None:
    """Runs first in its process: the peak RSS grows by this rank's share, not by the full model."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:  # torch imports it on first use where installed (~72 MB
        import triton  # noqa: F401 - of RSS): a library's import cost, not what loading a shard adds
    cfg = ModelConfig.from_json(path)
    mesh = init_mesh(ParallelConfig(tp=2), cfg)
    before = peak_rss()  # after the process group and the mesh: what loading adds
    model = sharded_load(path, mesh, dtype=torch.bfloat16)
    grown = peak_rss() - before
    local = local_nbytes(model)
    assert local < 0.55 * full_bytes, (local, full_bytes)
    assert model.sharded_load_bytes <= 1.01 * local, "read more bytes than the rank's share"
    print(f"rank {rank}: peak RSS grew {grown / 1e6:.0f} MB loading a {full_bytes / 1e6:.0f} MB model "
          f"(local share {local / 1e6:.0f} MB)")
    # The share plus a fixed ~30 MB the first model build costs any process (measured), never the full model.
    assert grown < 1.05 * local + 48e6, f"peak RSS grew {grown / 1e6:.0f} MB for a {local / 1e6:.0f} MB share"
    assert grown < 0.65 * full_bytes, f"peak RSS grew {grown / 1e6:.0f} MB for a {full_bytes / 1e6:.0f} MB model"
    # Same numbers as the full model, loaded afterwards (the peak above is already measured).
    ids = ids_for(cfg, b=1, t=8)
    full = load_model(path, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = model(ids).logits.float(), full(ids).logits.float()
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()


def sharded_load_ep(rank: int, world: int, path: str) -> None:
    """ep x tp boxes (experts by ep, widths by tp) read from the per-expert HF tensors, fp32 exact."""
    cfg = ModelConfig.from_json(path)
    sizes = ParallelConfig(ep=2, tp=world // 2)
    model = sharded_load(path, init_mesh(sizes, cfg), dtype=torch.float32)
    ref = parallelize(load_model(path, dtype=torch.float32), init_mesh(sizes, cfg))
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    ids = ids_for(cfg, b=1, t=6)
    with torch.no_grad():
        assert_logits_equal(model(ids).logits, load_model(path, dtype=torch.float32)(ids).logits)


def engine_greedy(rank: int, world: int, sizes: ParallelConfig, cfg: ModelConfig) -> None:
    """The paged-KV engine on a parallel model (rank 0 schedules, all ranks run each step) generates
    the single-process engine's greedy tokens: chunked prefill, prefix-cache hits and batched decodes."""
    from ernie45.engine.llm import LLM
    from ernie45.engine.sampling_params import SamplingParams
    from ernie45.parallel.runner import DistributedModelRunner, worker_loop

    ref = build(cfg)
    par = parallelize(copy.deepcopy(ref), init_mesh(sizes, cfg))
    if rank != 0:
        assert worker_loop(par) > 5
        return
    base = ids_for(cfg, b=1, t=40, seed=5)[0].tolist()
    prompts = [base[:7], base, base[:30] + [3, 4, 5], base[10:13]]  # shared prefixes hit the prefix cache
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    opts = dict(kv_cache_memory="1MB", max_num_batched_tokens=24, block_size=8)
    want = [o.outputs[0].token_ids for o in LLM(ref, **opts).generate(prompts, params)]
    with pytest.raises(ValueError, match="runner=ernie45.parallel.runner.DistributedModelRunner"):
        LLM(par, **opts)  # a split model on the one-process runner would hang in its first collective
    llm = LLM(par, runner=DistributedModelRunner, **opts)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.stats()["prefix_cache_hit_tokens"] > 0
    finally:
        llm.engine.runner.shutdown()
    assert got == want


def engine_tp2(rank: int, world: int) -> None:
    engine_greedy(rank, world, ParallelConfig(tp=2), TP_CONFIGS["moe-kv1-tied"])


def engine_ep2(rank: int, world: int) -> None:
    engine_greedy(rank, world, ParallelConfig(ep=2), EP_CONFIGS["moe-noshared-interval"])


# -------------------------------------------------------------------------------------- 4 ranks
def tp2_ep2_logits(rank: int, world: int) -> None:
    compare_forward(ParallelConfig(ep=2, tp=2), {"moe-kv1-tied": TP_CONFIGS["moe-kv1-tied"], **EP_CONFIGS},
                    gen_tokens=6)


def engine_tp2_ep2(rank: int, world: int) -> None:
    engine_greedy(rank, world, ParallelConfig(tp=2, ep=2), TINY_MOE)


def dp2_ep2_training(rank: int, world: int) -> None:
    compare_training(ParallelConfig(dp=2, ep=2), TINY_MOE, fsdp=True, clip=0.05)

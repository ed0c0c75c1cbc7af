"""Training throughput, ours vs transformers (+ peft for LoRA), on the same weights and batches.

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_train.py [--batch 8] [--seq 256] [--steps 6]
    flock /tmp/ernie45-heavy.lock python benchmarks/bench_train.py --balance 150   # expert-load figures

The model is the bundled demo's shape (hidden 256, 4 layers: layer 0 dense, 3 MoE layers with 8 experts
top-2 + 1 shared, vocab 6144), random init, saved once and loaded by both. One training step = forward,
masked cross-entropy, backward, clip to 1.0, AdamW (lr 1e-4). Modes: full fine-tuning and LoRA r=8 with
target names q/k/v/o_proj, gate/up/down_proj: peft (through transformers' MoE weight conversion) then also
adapts the fused routed experts, so ours adds its per-expert adapters ('experts') too; the trainable counts
are printed (the two LoRA layouts for fused experts differ). fp32 and bf16 autocast. The two implementations
alternate step by step so that machine noise hits both alike; the figure is the median step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import median_range, paired_ratios, write_result  # noqa: E402
from ernie45 import ModelConfig, init_weights, load_model, save_model  # noqa: E402
from ernie45.model.model import ErnieForCausalLM  # noqa: E402
from ernie45.train.losses import masked_cross_entropy  # noqa: E402

DEMO_SHAPE = dict(vocab_size=6144, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, moe_num_experts=8, moe_k=2,
                  moe_num_shared_experts=1, moe_intermediate_size=256, moe_layer_start_index=1)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_ours(folder: str, lora: bool) -> torch.nn.Module:
    model = load_model(folder, dtype=torch.float32, progress=False).train()
    if lora:
        from ernie45.train.lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig(r=8, alpha=16, targets=LORA_TARGETS + ["experts"]))
    return model


def make_ref(folder: str, lora: bool) -> torch.nn.Module:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=LORA_TARGETS))
    return model


def step_fn(model: torch.nn.Module, ids: torch.Tensor, bf16: bool, ours: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x, y = ids[:, :-1], ids[:, 1:]

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).logits if ours else model(input_ids=x).logits
            loss = masked_cross_entropy(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for p in params)


def balance_runs(steps: int) -> str:
    """The demo pretraining recipe for ``steps`` steps with each balancing setting; expert imbalance
    (max/mean expert load, averaged over the MoE layers; 1.0 = even, 4.0 = all tokens on 2 of 8 experts)."""
    from ernie45.train.recipe import TrainConfig
    from ernie45.train.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe = os.path.join(root, "recipes", "demo_pretrain.yaml")
    tok = os.path.join(root, "ernie45", "assets", "demo")
    if not os.path.isfile(os.path.join(tok, "tokenizer.model")):  # before the demo exists: its build's tokenizer
        tok = os.path.join(root, "runs", "demo_tokenizer")
    # Without the aux loss the router collapses onto 2 experts within ~10 steps at this lr whatever the
    # bias does (measured on tiny-moe), so the comparison is the demo recipe with and without aux-free.
    settings = [("aux loss 0.01 only", 0.0, 0.01), ("aux loss 0.01 + aux-free 1e-3 (demo recipe)", 1e-3, 0.01)]
    rows = []
    cwd = os.getcwd()
    os.chdir(root)  # the recipe's data paths are relative to the repository
    try:
        for name, rate, coef in settings:
            with tempfile.TemporaryDirectory() as out:
                cfg = TrainConfig.from_yaml(recipe, output_dir=out, max_steps=steps, tokenizer=tok)
                cfg.aux_free_rate, cfg.aux_loss_coef, cfg.plot, cfg.save_every = rate, coef, False, steps
                hist = Trainer(cfg).train()
            im = [h["expert_imbalance"] for h in hist]
            q = max(1, steps // 10)
            mid = im[steps // 2 - q // 2: steps // 2 + q // 2 + 1]
            rows.append((name, statistics.mean(im[:q]), statistics.mean(mid), statistics.mean(im[-q:]),
                         statistics.mean(h["loss"] for h in hist[-q:])))
            print(rows[-1], flush=True)
    finally:
        os.chdir(cwd)
    table = ["| balancing | imbalance, first 10% | middle | last 10% | loss, last 10% |", "|---|---|---|---|---|"]
    table += [f"| {n} | {a:.2f} | {b:.2f} | {c:.2f} | {lo:.3f} |" for n, a, b, c, lo in rows]
    return (f"recipes/demo_pretrain.yaml (the demo model's pretraining: lr 2e-3, batch 8x256) for {steps} steps "
            f"with each balancing setting. Expert imbalance = max/mean token->expert load per MoE layer, averaged "
            f"over layers and over the steps of each window (1.0 = even; 4.0 = every token on 2 of the 8 "
            f"experts).\n\n" + "\n".join(table))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per implementation (after 2 warm-up)")
    ap.add_argument("--balance", type=int, default=0, metavar="STEPS",
                    help="instead: expert-load imbalance of the demo recipe with/without balancing, STEPS each")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.balance:
        text = balance_runs(args.balance)
        print(text)
        print("wrote", write_result("train-balance", text))
        return
    cfg = ModelConfig(**DEMO_SHAPE)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    tokens = args.batch * args.seq
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_model(init_weights(ErnieForCausalLM(cfg), seed=0), tmp)
        for lora in (False, True):
            for bf16 in (False, True):
                ours, n_ours = step_fn(make_ours(tmp, lora), ids, bf16, ours=True)
                ref, n_ref = step_fn(make_ref(tmp, lora), ids, bf16, ours=False)
                first = (ours(), ref())  # warm-up; also the step-0 losses of identical weights and batch
                ours(), ref()
                t_ours, t_ref = [], []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    ours()
                    t1 = time.perf_counter()
                    ref()
                    t_ref.append(time.perf_counter() - t1)
                    t_ours.append(t1 - t0)
                ratios = paired_ratios(t_ours, t_ref, higher_is_better=False)
                row = ("LoRA r=8" if lora else "full", "bf16 autocast" if bf16 else "fp32", n_ours, n_ref,
                       median_range([tokens / t for t in t_ours], "{:.0f}"),
                       median_range([tokens / t for t in t_ref], "{:.0f}"),
                       median_range(ratios, unit="x"), first[0], first[1])
                rows.append(row)
                print(row, flush=True)
    table = ["| mode | precision | trainable ours / transformers | ours tok/s | transformers tok/s | ratio | "
             "step-0 loss ours / transformers |", "|---|---|---|---|---|---|---|"]
    table += [f"| {m} | {p} | {a:,} / {b:,} | {o} | {r} | **{x}** | {lo:.4f} / {lr:.4f} |"
              for m, p, a, b, o, r, x, lo, lr in rows]
    text = (f"Demo-model shape ({cfg.num_params():,} params; layer 0 dense, 3 MoE layers of 8 experts top-2 + 1 "
            f"shared), batch {args.batch}x{args.seq} = {tokens} tokens per step, AdamW + clip, {args.steps} steps of "
            f"each, alternating (ours, then transformers). tok/s: the median step's, the range over steps in "
            f"brackets; ratio: the median over the steps of transformers' step time / ours in the same pair "
            f"(> 1: we are faster), its range in brackets. "
            f"transformers uses its default attention (sdpa) and fused experts; LoRA r=8 on attention, MLP and "
            f"routed-expert weights in both (peft for transformers; its counts include its own expert layout).\n\n"
            + "\n".join(table))
    print(text)
    print("wrote", write_result("train", text))


if __name__ == "__main__":
    main()

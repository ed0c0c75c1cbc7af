"""`ernie45 train pretrain|sft|dpo|upo --config recipe.yaml [--resume]`: the training verb of ernie45/cli.py."""

from __future__ import annotations

import argparse
import logging


def cmd_train(args: argparse.Namespace) -> int:
    from ernie45.train.recipe import TrainConfig
    from ernie45.train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = TrainConfig.from_yaml(args.config, output_dir=args.output_dir, max_steps=args.max_steps)
    if cfg.task != args.task:
        raise ValueError(f"{args.config} is a {cfg.task!r} recipe; run `ernie45 train {cfg.task} --config "
                         f"{args.config}` or set task: {args.task} in it")
    if cfg.task == "upo" and getattr(args, "pp", 1) > 1:
        raise ValueError("train upo runs on one process or on --ep/--fsdp ranks, not on pipeline stages; drop --pp")
    if getattr(args, "pp", 1) > 1:  # pipeline stages x (ep, fsdp) ranks (ernie45.train.pipeline_trainer)
        from ernie45.parallel.launch import relaunch_with_torchrun, under_torchrun
        from ernie45.train.pipeline_trainer import PipelineTrainer, check_pipeline_layout

        nproc = check_pipeline_layout(cfg, args.pp, args.ep, args.fsdp)
        if not under_torchrun():
            relaunch_with_torchrun(nproc, "ernie45.cli")  # `ernie45 train ...` again, as torchrun (exec)
        trainer = PipelineTrainer(cfg, args.pp, ep=args.ep, fsdp=args.fsdp, schedule=args.schedule,
                                  microbatches=args.microbatches, virtual=args.virtual)
    elif args.ep > 1 or args.fsdp > 1:  # several ranks: ernie45.parallel (torchrun started here when needed)
        from ernie45.parallel.launch import relaunch_with_torchrun, under_torchrun
        from ernie45.train.distributed import DistributedTrainer, check_layout

        nproc = check_layout(cfg, args.ep, args.fsdp)
        if not under_torchrun():
            relaunch_with_torchrun(nproc, "ernie45.cli")  # `ernie45 train ...` again, as torchrun (exec)

        if cfg.task == "upo":  # each rank rolls out on a plain replica synced from the shards
            from ernie45.train.upo_distributed import DistributedUPOTrainer

            trainer = DistributedUPOTrainer(cfg, ep=args.ep, fsdp=args.fsdp)
        else:
            trainer = DistributedTrainer(cfg, ep=args.ep, fsdp=args.fsdp)
    elif cfg.task == "upo":
        from ernie45.train.upo import UPOTrainer

        trainer = UPOTrainer(cfg)
    else:
        trainer = Trainer(cfg)
    history = trainer.train(resume=args.resume)
    if history and getattr(trainer, "rank", 0) == 0:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}; model in {cfg.output_dir}/final")
    return 0


def add_train_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    s = sub.add_parser("train", help="pretrain, SFT, DPO or online UPO (full or LoRA) from a recipe (recipes/)")
    s.add_argument("task", choices=["pretrain", "sft", "dpo", "upo"])
    s.add_argument("--config", required=True, help="recipe YAML (keys: ernie45.train.recipe.TrainConfig)")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    s.add_argument("--output-dir", help="override the recipe's output_dir")
    s.add_argument("--max-steps", type=int, help="override the recipe's max_steps")
    s.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (MoE); runs under torchrun")
    s.add_argument("--fsdp", type=int, default=1, help="ranks that shard the dense weights with FSDP2 (= the number "
                   "of processes; ep must divide it); runs under torchrun")
    s.add_argument("--pp", type=int, default=1, help="pipeline stages (x the ep/fsdp data ranks = processes); "
                   "pretraining; runs under torchrun")
    s.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved-1f1b", "zb", "zbv"],
                   help="--pp schedule (torch.distributed.pipelining)")
    s.add_argument("--microbatches", type=int, default=None, help="--pp micro-batches per step (default pp)")
    s.add_argument("--virtual", type=int, default=1, help="--pp stages per rank for interleaved-1f1b / zb")
    s.set_defaults(func=cmd_train)

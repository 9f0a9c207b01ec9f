"""`medtune train`: fine-tune from a recipe, then print what came of it."""

from __future__ import annotations

import argparse

from medtune.commands.common import print_side_by_side, recipe_args
from medtune.lazy import lazy
from medtune.recipe import load_recipe, recipe_help
from medtune.run.card import number
from medtune.run.layout import CARD

gate = lazy("medtune.eval.gate")
job = lazy("medtune.train.job")
distributed = lazy("medtune.train.distributed")
allocator = lazy("medtune.train.allocator")


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model from a recipe", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune from a recipe. Recipe keys (override any with key=value):\n\n" + recipe_help())
    recipe_args(p)
    p.add_argument("--nproc", type=int, default=0, metavar="N", help="train with N processes on this machine through "
                   "torchrun (gloo on CPU, NCCL on GPU); for several machines or FSDP/DeepSpeed see recipes/launch/")
    p.add_argument("--force", action="store_true", help="start even when the memory estimate says it will not fit")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if getattr(args, "process_entry", False):  # never inside a caller's process (tests, notebooks)
        allocator.allocator_for_training(recipe.train.device, recipe.train.release_memory)  # may re-execute once
    if args.nproc:
        distributed.launch(args.nproc, ["train", args.recipe, *args.overrides, *(["--force"] if args.force else [])])
    result = job.run_training(recipe, force=args.force)
    if not result.main:
        return 0
    m = result.metrics
    print(f"\nrun: {result.run_dir}")
    print(f"trained {int(m['steps'])} steps in {m['train_seconds']:.0f} s ({m['tokens_per_s']:.0f} tokens/s), "
          f"final train loss {m['train_loss']:.4f}")
    if "base_eval_ppl" in m and "eval_ppl" in m:  # the card's rounding: one figure everywhere
        print(f"held-out perplexity: base {number(m['base_eval_ppl'])} -> tuned {number(m['eval_ppl'])}")
    print_side_by_side(result.samples)
    print(f"\nnext: medtune chat {result.run_dir}    |    model card: {result.run_dir / CARD}")
    if result.gate is not None:
        print("\n" + gate.format_gate(result.gate))
        return 0 if result.gate["passed"] else 1
    return 0

"""`medtune data check`: what the data road makes of a recipe's rows, without training."""

from __future__ import annotations

from medtune.commands.common import recipe_args
from medtune.lazy import lazy
from medtune.recipe import load_recipe

pipeline = lazy("medtune.data.pipeline")
memory = lazy("medtune.train.memory")


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect training data without training")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("check", help="rows read/kept/dropped by reason, token lengths, the first rendered example")
    recipe_args(q)
    q.set_defaults(func=cmd_data_check)


def cmd_data_check(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    inputs = pipeline.prepare_inputs(recipe)
    chat = inputs.chat
    print(f"model: {recipe.model} (template {chat.template}, stops on {', '.join(chat.stop_tokens)}, "
          f"pad {chat.pad_token})")
    print("\n".join(inputs.data.report.lines()))
    print(memory.memory_report(recipe, inputs.model_dir))
    return 0

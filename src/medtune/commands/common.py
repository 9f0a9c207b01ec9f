"""What several commands share: flags → a function's or dataclass's keyword arguments, the command line as run,
the recipe and device arguments, and the side-by-side answers."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import shlex
import sys

from medtune.sidebyside import side_by_side

DEVICES = ["auto", "cpu", "cuda"]
PRECISIONS = ["auto", "bf16", "fp32"]
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def names_of(target) -> list[str]:
    """A dataclass's field names, or the parameters a function takes by name."""
    if dataclasses.is_dataclass(target):
        return [f.name for f in dataclasses.fields(target)]
    return [p.name for p in inspect.signature(target).parameters.values() if p.kind in _NAMED]


def args_for(target, args: argparse.Namespace, **given) -> dict:
    """Keyword arguments for `target` (a dataclass or a function): every parsed flag whose dest is one of its
    field/parameter names, then `given` (what the command computes, e.g. the parsed --task list) over them."""
    flags = vars(args)
    return {**{name: flags[name] for name in names_of(target) if name in flags}, **given}


def options_from_args(cls, args: argparse.Namespace, **given):
    """An options dataclass built from the parsed flags (see args_for); fields no flag names keep their defaults."""
    return cls(**args_for(cls, args, **given))


def command_line() -> str:
    """The command as the user typed it, for results files."""
    return shlex.join(["medtune", *sys.argv[1:]])


def recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. lora.r=16 train.max_steps=50")


def device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES)


def print_side_by_side(samples: list[dict]) -> None:
    if samples:
        print("\n" + side_by_side(samples))

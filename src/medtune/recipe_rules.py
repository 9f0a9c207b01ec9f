"""The rules between recipe keys: settings that are each valid alone but not together.

Each rule is a function of the whole recipe that raises `RuleBroken` naming the keys it read, the key to fix
first. `Recipe` runs every rule in `RULES` as its last validator, so `load_recipe` refuses a broken recipe before
any data is read or any model loads (one line naming the file and the key, exit 2), and a new rule only needs
adding to `RULES`. What a rule cannot know from the recipe alone (a column missing from a file, a split that
held out no row, a template the tokenizer lacks) is checked where that file or model is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medtune.data.benchmark_files import BENCHMARKS

if TYPE_CHECKING:
    from medtune.recipe import Recipe


class RuleBroken(ValueError):
    """A recipe that breaks a rule: the reason, and the keys the rule read (the first is the one named)."""

    def __init__(self, reason: str, *keys: str):
        super().__init__(reason)
        self.reason, self.keys = reason, keys

    @property
    def field(self) -> str:
        return self.keys[0]


def objective_matches_format(recipe: Recipe) -> None:
    """dpo/orpo train on preference pairs, sft on single answers: the two settings must agree."""
    preference, objective = recipe.data.format == "preference", recipe.train.objective
    if preference != (objective != "sft"):
        need = "data.format=preference needs train.objective dpo or orpo" if preference else \
            f"train.objective={objective} needs data.format=preference"
        raise RuleBroken(f"{need} (data.format={recipe.data.format}, train.objective={objective})",
                         "train.objective", "data.format")


def preference_learns_answers_only(recipe: Recipe) -> None:
    if recipe.data.format == "preference" and recipe.data.train_on_prompt:
        raise RuleBroken("preference objectives learn only the answers; set data.train_on_prompt=false",
                         "data.train_on_prompt", "data.format")


def preference_has_no_perplexity(recipe: Recipe) -> None:
    if recipe.data.format == "preference" and "perplexity" in recipe.eval.after_train:
        raise RuleBroken("eval.after_train perplexity reads single answers, not preference pairs; drop it or "
                         "run `medtune eval` with --data", "eval.after_train", "data.format")


def early_stopping_needs_evaluations(recipe: Recipe) -> None:
    """Patience counts evaluations; whether the data leaves held-out rows is known only once it is split."""
    if recipe.train.early_stopping_patience and not recipe.train.eval_steps:
        raise RuleBroken("train.early_stopping_patience needs train.eval_steps > 0 and held-out data",
                         "train.early_stopping_patience", "train.eval_steps")


def samples_from_eval_need_prompts(recipe: Recipe) -> None:
    if recipe.samples.from_eval and recipe.data.format == "text":
        raise RuleBroken("samples.from_eval needs prompts: a chat data format, not data.format=text",
                         "samples.from_eval", "data.format")


def after_train_benchmarks_have_files(recipe: Recipe) -> None:
    """A benchmark in eval.after_train is scored when training ends: its file must be named before it starts."""
    for task in (t for t in recipe.eval.after_train if t in BENCHMARKS):
        if not getattr(recipe.eval, task):
            raise RuleBroken(f"eval.after_train {task} needs its file: eval.{task}", f"eval.{task}",
                             "eval.after_train")


def after_train_shots_are_named(recipe: Recipe) -> None:
    cfg = recipe.eval
    for task in (t for t in cfg.after_train if t in BENCHMARKS):
        if cfg.fewshot and task not in cfg.fewshot_data:
            raise RuleBroken(f"eval.fewshot needs the shots of {task}: eval.fewshot_data {{{task}: FILE}}, a "
                             "separate file (MMLU: folder) of the same layout", "eval.fewshot_data", "eval.fewshot",
                             "eval.after_train")


RULES = (objective_matches_format, preference_learns_answers_only, preference_has_no_perplexity,
         early_stopping_needs_evaluations, samples_from_eval_need_prompts, after_train_benchmarks_have_files,
         after_train_shots_are_named)


def check_rules(recipe: Recipe) -> None:
    for rule in RULES:
        rule(recipe)

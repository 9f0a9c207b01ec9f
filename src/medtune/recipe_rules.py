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


OBJECTIVE_FORMATS = {"dpo": "preference", "orpo": "preference", "simpo": "preference", "kto": "feedback"}
# train.* keys that only one objective reads, with that objective; the rule: a key moved off its default needs it
OBJECTIVE_KEYS = {"dpo_loss_type": ("dpo",), "kto_desirable_weight": ("kto",), "kto_undesirable_weight": ("kto",),
                  "simpo_gamma": ("simpo",), "precompute_reference": ("dpo",)}


def objective_matches_format(recipe: Recipe) -> None:
    """Pairs for dpo/orpo/simpo, feedback rows for kto, single answers for sft."""
    fmt, objective = recipe.data.format, recipe.train.objective
    need = OBJECTIVE_FORMATS.get(objective)
    if fmt != need and (need or fmt in OBJECTIVE_FORMATS.values()):
        fits = " or ".join(k for k, v in OBJECTIVE_FORMATS.items() if v == fmt)
        rule = f"train.objective={objective} needs data.format={need}" if need else \
            f"data.format={fmt} needs train.objective {fits}"
        raise RuleBroken(f"{rule} (data.format={fmt}, train.objective={objective})", "train.objective",
                         "data.format")


def objective_keys_apply(recipe: Recipe) -> None:
    """An objective's own key (OBJECTIVE_KEYS) moved off its default needs that objective."""
    cfg = recipe.train
    for key, objectives in OBJECTIVE_KEYS.items():
        if cfg.objective not in objectives and getattr(cfg, key) != type(cfg).model_fields[key].default:
            raise RuleBroken(f"train.{key} is read only by train.objective {' or '.join(objectives)} "
                             f"(train.objective={cfg.objective})", f"train.{key}", "train.objective")


def label_smoothing_applies(recipe: Recipe) -> None:
    cfg = recipe.train
    if cfg.label_smoothing and not (cfg.objective == "simpo" or (cfg.objective, cfg.dpo_loss_type) == ("dpo", "robust")):
        raise RuleBroken("train.label_smoothing is read only by train.objective simpo, or dpo with "
                         "train.dpo_loss_type=robust", "train.label_smoothing", "train.objective",
                         "train.dpo_loss_type")


def kto_batch_has_others(recipe: Recipe) -> None:
    """KTO's reference point pairs each prompt with another row's answer of the same batch (as TRL requires)."""
    if recipe.train.objective == "kto" and recipe.train.batch_size < 2:
        raise RuleBroken("kto estimates its reference point from the other answers of a batch; set "
                         "train.batch_size to 2 or more", "train.batch_size", "train.objective")


def preference_learns_answers_only(recipe: Recipe) -> None:
    if recipe.data.format in OBJECTIVE_FORMATS.values() and recipe.data.train_on_prompt:
        raise RuleBroken("preference objectives learn only the answers; set data.train_on_prompt=false",
                         "data.train_on_prompt", "data.format")


def preference_has_no_perplexity(recipe: Recipe) -> None:
    fmt = recipe.data.format
    if fmt in OBJECTIVE_FORMATS.values() and "perplexity" in recipe.eval.after_train:
        what = "preference pairs" if fmt == "preference" else "feedback rows"
        raise RuleBroken(f"eval.after_train perplexity reads single answers, not {what}; drop it or "
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


RULES = (objective_matches_format, objective_keys_apply, label_smoothing_applies, kto_batch_has_others,
         preference_learns_answers_only, preference_has_no_perplexity,
         early_stopping_needs_evaluations, samples_from_eval_need_prompts, after_train_benchmarks_have_files,
         after_train_shots_are_named)


def check_rules(recipe: Recipe) -> None:
    for rule in RULES:
        rule(recipe)

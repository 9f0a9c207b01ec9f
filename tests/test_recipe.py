"""Recipes: YAML + key=value overrides → a validated Recipe; mistakes name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtune.cli import main
from medtune.data.readers import demo_path
from medtune.errors import MedtuneError
from medtune.eval.inputs import eval_recipe
from medtune.recipe import DEFAULT_MODEL, Recipe, load_recipe, parse_overrides, recipe_help
from medtune.recipe_rules import (
    RULES,
    after_train_benchmarks_have_files,
    after_train_shots_are_named,
    early_stopping_needs_evaluations,
    kto_batch_has_others,
    label_smoothing_applies,
    objective_keys_apply,
    objective_matches_format,
    preference_has_no_perplexity,
    preference_learns_answers_only,
    samples_from_eval_need_prompts,
)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_defaults():
    recipe = load_recipe(None)
    assert recipe == Recipe()
    assert recipe.model == DEFAULT_MODEL and recipe.lora.r == 16 and recipe.data.format == "template"
    assert recipe.run_dir == Path("runs/run")


def test_overrides_of_nested_keys():
    recipe = load_recipe(None, ["lora.r=8", "quant.load_in_4bit=true", "data.path=x", "lora.target_modules=[q_proj,v_proj]",
                                "model=foo", "output_dir=o", "train.eval_steps=5", "train.max_steps=3"])
    assert recipe.lora.r == 8
    assert recipe.quant.load_in_4bit is True
    assert recipe.data.path == "x"
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.model == "foo"
    assert recipe.output_dir == "o" and recipe.run_dir == Path("o")
    assert recipe.train.eval_steps == 5
    assert recipe.train.max_steps == 3
    # untouched siblings keep their defaults
    assert recipe.lora.alpha == 32 and recipe.quant.quant_type == "nf4" and recipe.train.batch_size == 4


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=", "f=true"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2],
                                                                             "e": "", "f": True}


def test_yaml_file_then_overrides(write_file):
    path = write_file("med.yaml", "model: base\nlora:\n  r: 4\n  alpha: 8\ntrain:\n  lr: 1.0e-3\n")
    recipe = load_recipe(path, ["lora.r=8", "train.packing=true"])
    assert (recipe.name, recipe.model) == ("med", "base")
    assert (recipe.lora.r, recipe.lora.alpha) == (8, 8)
    assert (recipe.train.lr, recipe.train.packing) == (1e-3, True)
    assert recipe.to_dict()["lora"]["r"] == 8


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name
    assert Recipe.model_validate(recipe.to_dict()) == recipe
    if recipe.data.path.startswith("demo:"):
        assert demo_path(recipe.data.path.split(":", 1)[1]).is_file()


# ---- mistakes -------------------------------------------------------------------------------------------------------

def error(path, overrides=None) -> MedtuneError:
    with pytest.raises(MedtuneError) as err:
        load_recipe(path, overrides)
    return err.value


def test_unknown_key_in_an_override():
    err = error(None, ["lora.rr=3"])
    assert "field 'lora.rr': unknown recipe key 'lora.rr'" in str(err)
    assert err.field == "lora.rr"


def test_unknown_key_in_the_yaml_file(write_file):
    path = write_file("med.yaml", "lora:\n  rr: 3\n")
    assert str(error(path)).startswith(f"{path}, field 'lora.rr': unknown recipe key 'lora.rr'")


def test_unknown_key_in_an_override_is_not_blamed_on_the_file(write_file):
    path = write_file("med.yaml", "lora:\n  r: 4\n")
    assert str(error(path, ["lora.rr=3"])).startswith(f"{path} (command line), field 'lora.rr'")
    assert str(error(None, ["lora.rr=3"])).startswith("command line, field 'lora.rr'")


def test_wrong_value_type():
    err = error(None, ["train.max_steps=abc"])
    assert "field 'train.max_steps'" in str(err) and "(got 'abc')" in str(err)


def test_wrong_value_type_in_the_file(write_file):
    path = write_file("med.yaml", "train:\n  batch_size: 0\n")
    msg = str(error(path))
    assert msg.startswith(f"{path}, field 'train.batch_size': ") and "(got 0)" in msg


def test_unknown_data_format():
    err = error(None, ["data.format=foo"])
    assert "field 'data.format'" in str(err) and "(got 'foo')" in str(err)
    assert "'text', 'messages', 'instruction', 'qa', 'template', 'preference' or 'feedback'" in str(err)


@pytest.mark.parametrize("override, meant", [
    ("lora.rank=8", "lora.r"),                    # another tool's name for the key
    ("train.learning_rate=1e-4", "train.lr"),
    ("train.optimiser=sgd", "train.optimizer"),   # a typo
    ("lora.alpah=8", "lora.alpha"),
    ("train.rank=8", "lora.r"),                   # right name, wrong section
    ("max_length=256", "data.max_length"),
])
def test_unknown_key_suggests_the_nearest_one(override, meant):
    key = override.split("=")[0]
    assert str(error(None, [override])) == (f"command line, field '{key}': unknown recipe key '{key}' "
                                           f"(did you mean {meant}?)")


def test_unknown_key_in_the_file_suggests_the_nearest_one(write_file):
    path = write_file("med.yaml", "lora:\n  rank: 8\n")
    assert str(error(path)) == f"{path}, field 'lora.rank': unknown recipe key 'lora.rank' (did you mean lora.r?)"


def test_unknown_key_with_no_near_one_points_to_help():
    assert str(error(None, ["zzz=1"])).endswith("unknown recipe key 'zzz' (see `medtune train --help` for the keys)")


@pytest.mark.parametrize("alias, fmt", [("alpaca", "instruction"), ("sharegpt", "messages"), ("ShareGPT", "messages")])
def test_alpaca_and_sharegpt_are_aliases_of_data_formats(alias, fmt, write_file):
    assert load_recipe(None, [f"data.format={alias}"]).data.format == fmt
    assert load_recipe(None, [f"data.replay.format={alias}"]).data.replay.format == fmt
    path = write_file("mix.yaml", f"data:\n  sources:\n    - path: a.jsonl\n      format: {alias}\n")
    assert load_recipe(path).data.sources[0].format == fmt


def test_override_that_is_not_key_value():
    msg = str(error(None, ["lora.r"]))
    assert "command line" in msg and msg.endswith(": override 'lora.r' is not key=value")


def test_override_below_a_value_is_an_error():
    msg = str(error(None, ["model=foo", "model.x=1"]))
    assert "command line" in msg and msg.endswith(": cannot set 'model.x': 'model' is not a section")


def test_recipe_file_not_found(tmp_path):
    assert str(error(tmp_path / "nope.yaml")) == f"{tmp_path / 'nope.yaml'}: recipe file not found"


def test_recipe_file_that_is_not_a_mapping(write_file):
    path = write_file("list.yaml", "- a\n- b\n")
    assert str(error(path)) == f"{path}: a recipe is a mapping of keys to values"


def test_recipe_file_that_is_not_yaml(write_file):
    path = write_file("bad.yaml", "lora: [1, 2\n")
    assert str(error(path)).startswith(f"{path}: not valid YAML: ")


def test_bad_run_name():
    assert "field 'name'" in str(error(None, ["name=my run"]))


@pytest.mark.parametrize("override, field, value", [
    ("tokenizer.system_prompt=Answer: briefly", "system_prompt", "Answer: briefly"),
    ("tokenizer.system_prompt=yes", "system_prompt", "yes"),
    ("name=2024", "name", "2024"),
])
def test_text_overrides_stay_text(override, field, value):
    recipe = load_recipe(None, [override])
    section = recipe.tokenizer if override.startswith("tokenizer.") else recipe
    assert getattr(section, field) == value


# ---- the rules between keys ----------------------------------------------------------------------------------------

PREFERENCE = ["data.path=demo:preferences", "data.format=preference", "train.objective=dpo"]
# Per rule of recipe_rules.RULES: overrides that break it (and no rule before it), and the key its error names.
BREAKING = {
    objective_matches_format: (["data.path=demo:qa", "data.format=qa", "train.objective=dpo"], "train.objective"),
    objective_keys_apply: (["train.dpo_loss_type=ipo"], "train.dpo_loss_type"),
    label_smoothing_applies: ([*PREFERENCE, "train.label_smoothing=0.1"], "train.label_smoothing"),
    kto_batch_has_others: (["data.path=demo:feedback", "data.format=feedback", "train.objective=kto",
                            "train.batch_size=1"], "train.batch_size"),
    preference_learns_answers_only: ([*PREFERENCE, "data.train_on_prompt=true"], "data.train_on_prompt"),
    preference_has_no_perplexity: ([*PREFERENCE, "eval.after_train=[perplexity]"], "eval.after_train"),
    early_stopping_needs_evaluations: (["train.early_stopping_patience=2"], "train.early_stopping_patience"),
    samples_from_eval_need_prompts: (["data.format=text", "samples.from_eval=1"], "samples.from_eval"),
    after_train_benchmarks_have_files: (["eval.after_train=[perplexity, medqa]"], "eval.medqa"),
    after_train_shots_are_named: (["eval.after_train=[medqa]", "eval.medqa=medqa.jsonl", "eval.fewshot=3"],
                                  "eval.fewshot_data"),
}


def test_every_rule_has_a_recipe_that_breaks_it():
    assert list(BREAKING) == list(RULES)


@pytest.fixture
def no_model(monkeypatch):
    """medtune.models' loaders fail the test when called: a recipe mistake must stop medtune before them."""
    import medtune.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the recipe's rules were checked")

    for name in ("resolve_model", "load_tokenizer", "load_base_model"):
        monkeypatch.setattr(medtune.models, name, refuse)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_a_broken_rule_stops_train_and_data_check_before_any_model_loads(rule, no_model, write_file, tmp_path, capsys):
    overrides, field = BREAKING[rule]
    path = write_file("rules.yaml", "name: rules\n")
    assert error(None, overrides).field == field
    for command in (["train"], ["data", "check"]):
        assert main([*command, str(path), f"model={tmp_path / 'no-model'}", *overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"medtune: error: {path} (command line), field '{field}': ") and err.count("\n") == 1


def test_a_broken_rule_in_the_file_names_the_file(write_file):
    path = write_file("dpo.yaml", "data:\n  format: qa\ntrain:\n  objective: dpo\n")
    assert str(error(path)) == (f"{path}, field 'train.objective': train.objective=dpo needs data.format=preference "
                                "(data.format=qa, train.objective=dpo)")
    assert str(error(path, ["data.format=instruction"])).startswith(f"{path} (command line), field 'train.objective'")


def test_rules_hold_for_the_defaults_and_what_fixes_them():
    assert load_recipe(None) == Recipe()
    fixed = load_recipe(None, [*PREFERENCE, "eval.after_train=[]", "train.early_stopping_patience=2",
                               "train.eval_steps=5", "eval.fewshot=3", "eval.after_train=[medqa]",
                               "eval.medqa=medqa.jsonl", "eval.fewshot_data={medqa: shots.jsonl}"])
    assert fixed.train.objective == "dpo" and fixed.eval.fewshot_data == {"medqa": "shots.jsonl"}


def test_evaluating_a_run_on_plain_text_ignores_its_sample_prompts(write_file):
    """`medtune eval RUN --data notes.txt data.format=text` reads the run's recipe: its samples.from_eval, a
    training setting, must not refuse the text format evaluation asked for."""
    recipe = write_file("run.yaml", "data:\n  format: qa\nsamples:\n  from_eval: 2\n")
    assert eval_recipe("model", "notes.txt", str(recipe), ["data.format=text"]).data.format == "text"


# ---- help -----------------------------------------------------------------------------------------------------------

def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            keys += flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def test_recipe_help_lists_every_key_with_a_description():
    text = recipe_help()
    keys = flat_keys(Recipe().to_dict())
    assert {"lora.r", "quant.load_in_4bit", "data.path", "data.columns", "train.eval_steps", "tokenizer.pad_token",
            "samples.prompts", "model", "output_dir"} <= set(keys)
    lines = text.splitlines()
    listed = [line.split(" = ")[0].strip() for line in lines if line.startswith("  ") and not line.startswith("    ")]
    assert sorted(listed) == sorted(keys)  # every key once, and nothing else
    for i, line in enumerate(lines):
        if line.split(" = ")[0].strip() in keys and not line.startswith("    "):
            assert lines[i + 1].startswith("      ") and lines[i + 1].strip(), f"no description for {line}"
    assert "  lora.r = 16\n      LoRA rank." in text
    assert "  quant.load_in_4bit = False\n" in text


@pytest.mark.parametrize("key, values", [
    ("train.optimizer", "adamw, adamw_fused, sgd"),
    ("train.lr_scheduler", "linear, cosine, constant, constant_with_warmup"),
    ("report_to", "tensorboard, wandb, mlflow"),
    ("data.format", "text, messages, instruction, qa, template, preference, feedback"),
    ("train.objective", "sft, dpo, orpo, simpo, kto"),
    ("train.dpo_loss_type", "sigmoid, ipo, robust, hinge"),
    ("eval.after_train", "perplexity, medqa, pubmedqa, mmlu_medical, medmcqa, rouge"),
    ("quant.quant_type", "nf4, fp4"),
])
def test_recipe_help_lists_the_allowed_values_of_choice_fields(key, values):
    lines = recipe_help().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"  {key} = "))
    assert lines[at + 1].endswith(f" One of: {values}.")


def test_recipe_help_lists_values_for_every_literal_field_and_not_for_free_ones():
    from medtune.recipe_keys import choices

    lines = recipe_help().splitlines()
    described = {line.split(" = ")[0].strip(): lines[i + 1] for i, line in enumerate(lines) if " = " in line
                 and not line.startswith("    ")}
    assert "One of:" in described["tokenizer.padding_side"] and "One of:" in described["train.nan_policy"]
    assert "One of:" not in described["lora.target_modules"]  # names of layers, or all-linear: not a closed set
    assert "One of:" not in described["lora.r"]
    assert choices(Recipe.model_fields["report_to"].annotation) == ["tensorboard", "wandb", "mlflow"]


# ---- the recipe's model, offline -----------------------------------------------------------------------------------

def test_model_not_found_offline_says_what_was_tried(monkeypatch):
    from medtune.models import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MedtuneError) as err:
        resolve_model("no-such-org/no-such-model")
    assert str(err.value) == ("field 'model': model 'no-such-org/no-such-model' not found offline; tried the local hub "
                              "cache for no-such-org/no-such-model")


def test_model_folder_without_config(tmp_path):
    from medtune.models import resolve_model

    with pytest.raises(MedtuneError) as err:
        resolve_model(str(tmp_path))
    assert str(err.value) == f"{tmp_path}, field 'model': folder has no config.json, so it is not a model folder"


def test_model_folder_resolves_to_itself(tiny_model_dir):
    from medtune.models import resolve_model

    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)

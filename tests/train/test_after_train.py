"""What follows `train: 100%`: a line per phase (held-out eval, sample answers base/tuned, eval tasks base/tuned)
and how to skip them; and a run folder named after the data it trained on when data.path is overridden."""

from __future__ import annotations

import logging
from pathlib import Path

from conftest import tiny_recipe

from medtune.recipe import load_recipe
from medtune.train.job import run_training

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
SKIP = "Skip them with: samples.prompts=[] samples.from_eval=0 eval.after_train=[] eval.gate=false"
# conftest's tiny run cut to one packed step on rows of 96 tokens, at medtune's default lr and LoRA dropout
ONE_STEP = ("data.max_length=96", "train.max_steps=1", "train.lr=2e-4", "train.logging_steps=10", "train.packing=true",
            "lora.dropout=0.05")


def _phases(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "medtune"]


def test_every_phase_after_training_is_announced(tiny_model_dir, tmp_path, caplog):
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", *ONE_STEP, "data.limit=12", "train.seed=0",
                         "samples.prompts=[\"What is gout?\"]", "samples.from_eval=1", "samples.max_new_tokens=2",
                         "eval.after_train=[perplexity]")
    with caplog.at_level(logging.INFO, logger="medtune"):
        run_training(recipe)
    lines = _phases(caplog)
    after = lines[next(i for i, m in enumerate(lines) if m.startswith("after training: "))]
    assert after == f"after training: held-out eval (3 rows); 2 sample answers (base and tuned); eval tasks perplexity. {SKIP}"
    expected = ["held-out eval (tuned): 3 rows...", "sample answers 1/2 (base)...", "sample answers 1/2 (tuned)...",
                "sample answers 2/2 (base)...", "sample answers 2/2 (tuned)..."]
    phases = [m for m in lines if m in expected or m.startswith("eval perplexity (")]
    # eval.after_train's perplexity reuses the held-out scores of the base (before training) and of the tuned model
    # (the held-out eval above): no pass of its own.
    assert phases == expected


def test_nothing_announced_when_everything_is_skipped(tiny_model_dir, tmp_path, caplog):
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", *ONE_STEP, "data.limit=8", "data.eval_ratio=0",
                         "samples.prompts=[]", "samples.from_eval=0", "eval.after_train=[]")
    with caplog.at_level(logging.INFO, logger="medtune"):
        result = run_training(recipe)
    assert result.samples == []
    assert not [m for m in _phases(caplog) if m.startswith(("after training", "sample answers", "held-out eval",
                                                            "eval "))]


def test_run_folder_named_after_an_overridden_data_file():
    assert load_recipe(QUICKSTART).run_dir == Path("runs/quickstart")  # the plain case is unchanged
    assert load_recipe(QUICKSTART, ["data.path=demo:terms"]).run_dir == Path("runs/quickstart")  # its own data
    assert load_recipe(QUICKSTART, ["data.path=/data/my notes.jsonl"]).run_dir == Path("runs/quickstart-my-notes")
    assert load_recipe(QUICKSTART, ["data.path=demo:doctor_chats"]).name == "quickstart-doctor_chats"
    # An explicit name or output_dir wins; a recipe-less run keeps its default.
    assert load_recipe(QUICKSTART, ["data.path=x.csv", "name=mine"]).run_dir == Path("runs/mine")
    assert load_recipe(QUICKSTART, ["data.path=x.csv", "output_dir=out/a"]).run_dir == Path("out/a")
    assert load_recipe(None, ["data.path=x.csv"]).run_dir == Path("runs/run")

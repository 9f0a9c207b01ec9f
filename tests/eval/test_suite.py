"""`eval.after_train` in a recipe: the tasks run when training ends and land in RUN/eval and the model card."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_recipe

from medtune.errors import MedtuneError
from medtune.eval.suite import EvalOptions, check_options, parse_paths, parse_tasks
from medtune.train.job import run_training


def test_parse_tasks_and_paths():
    assert parse_tasks(["pubmedqa,medqa", "pubmedqa", " perplexity"]) == ["pubmedqa", "medqa", "perplexity"]
    assert parse_paths(["f.json"], ["pubmedqa"], "--data") == {"pubmedqa": "f.json"}
    assert parse_paths(["medqa=a.jsonl", "pubmedqa=b=c.json"], ["medqa", "pubmedqa"], "--data") == \
        {"medqa": "a.jsonl", "pubmedqa": "b=c.json"}
    with pytest.raises(MedtuneError, match="TASK=PATH"):
        parse_paths(["f.json"], ["medqa", "pubmedqa"], "--data")


@pytest.mark.parametrize(("opts", "message"), [
    (EvalOptions("m", ["bleurt"]), "unknown task"),
    (EvalOptions("m", ["pubmedqa"]), "needs its file"),
    (EvalOptions("m", ["perplexity"], compare_base=True), "run directory"),
    (EvalOptions("m", ["perplexity"]), "needs --data"),
])
def test_option_mistakes(opts, message):
    with pytest.raises(MedtuneError, match=message):
        check_options(opts)


def test_after_train_writes_results_and_card(tiny_model_dir, tmp_path):
    medqa = tmp_path / "medqa.jsonl"
    medqa.write_text("".join(json.dumps({"question": f"What treats {c}?", "answer_idx": "A",
                                         "options": {"A": "Rest", "B": "Surgery", "C": "Nothing", "D": "Ice"}}) + "\n"
                             for c in ("fever", "gout", "acne", "asthma")))
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model_dir, out, "data.limit=16", "data.max_length=1024", "train.max_steps=2",
                         "train.lr=2e-4", "train.logging_steps=10", "lora.r=2", "lora.dropout=0.05",
                         "eval.after_train=[perplexity, medqa]", f"eval.medqa={medqa}")
    result = run_training(recipe)
    # max_length 1024 truncates nothing, so the training loop's own held-out perplexity is the same number
    ppl = json.loads((out / "eval" / "perplexity.json").read_text())["perplexity"]
    assert ppl["tuned"]["perplexity"] == pytest.approx(result.metrics["eval_ppl"], rel=1e-4)
    bench = json.loads((out / "eval" / "medqa.json").read_text())["medqa"]
    assert bench["base"]["n"] == bench["tuned"]["n"] == 4 and "acc" in bench["delta"]
    card = (out / "README.md").read_text()
    assert "| medqa | acc |" in card and "| perplexity | perplexity |" in card

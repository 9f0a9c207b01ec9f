"""Paired bootstrap on synthetic items (signs, intervals, significance), and `--compare-base` on a tiny run:
base and tuned on the same items, deltas with intervals, results in RUN/eval and the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_recipe

from medtune.cli import main
from medtune.eval.compare import mean_of, paired_bootstrap, perplexity_of
from medtune.train.job import run_training


def test_clear_improvement_is_significant():
    base = np.array([[0.0]] * 30 + [[1.0]] * 10)
    tuned = np.array([[1.0]] * 40)
    row = paired_bootstrap(base, tuned, mean_of(0), iters=500)
    assert row["delta"] == pytest.approx(0.75) and row["significant"] and row["better"] is True
    assert 0 < row["ci_low"] <= row["delta"] <= row["ci_high"] <= 1


def test_identical_models_are_not_significant():
    rng = np.random.default_rng(1)
    items = rng.integers(0, 2, size=(50, 1)).astype(float)
    row = paired_bootstrap(items, items, mean_of(0), iters=200)
    assert row["delta"] == 0 and row["ci_low"] == row["ci_high"] == 0 and not row["significant"]
    assert row["better"] is None


def test_noise_is_not_significant():
    base = np.array([[1.0], [0.0]] * 5)  # 50%
    tuned = np.array([[0.0], [1.0]] * 4 + [[1.0], [1.0]])  # 60%, different items right
    row = paired_bootstrap(base, tuned, mean_of(0), iters=1000)
    assert row["delta"] == pytest.approx(0.1) and row["ci_low"] < 0 < row["ci_high"] and not row["significant"]


def test_lower_perplexity_is_better():
    base = np.array([[20.0, 10]] * 20)  # loss 2.0 per token
    tuned = np.array([[10.0, 10]] * 20)  # loss 1.0
    row = paired_bootstrap(base, tuned, perplexity_of, iters=100, higher_is_better=False)
    assert row["base"] == pytest.approx(np.exp(2)) and row["tuned"] == pytest.approx(np.e)
    assert row["delta"] < 0 and row["significant"] and row["better"] is True


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    recipe = tiny_recipe(tiny_model_dir, out, "train.max_steps=8", "train.logging_steps=10")
    return run_training(recipe).run_dir


def test_compare_base_on_a_run(run_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(["eval", str(run_dir), "--task", "perplexity", "--compare-base", "--bootstrap", "200", "--precision", "fp32",
                 "--set", "data.max_length=128", "--json", str(out)])  # truncated as in training
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())["perplexity"]
    delta = result["delta"]["perplexity"]
    # trained on the same kind of rows at a high learning rate: held-out perplexity falls, delta = tuned - base < 0
    assert result["tuned"]["perplexity"] < result["base"]["perplexity"]
    assert delta["delta"] == pytest.approx(result["tuned"]["perplexity"] - result["base"]["perplexity"])
    assert delta["ci_low"] <= delta["delta"] <= delta["ci_high"]
    assert result["base"]["tokens"] == result["tuned"]["tokens"] > 0
    metrics = json.loads((run_dir / "metrics_final.json").read_text())  # the loop's own held-out figures
    assert result["tuned"]["perplexity"] == pytest.approx(metrics["eval_ppl"], rel=1e-4)
    assert result["base"]["perplexity"] == pytest.approx(metrics["base_eval_ppl"], rel=1e-4)
    assert "95% CI" in printed and "significant" in printed
    saved = json.loads((run_dir / "eval" / "perplexity.json").read_text())
    assert saved["perplexity"] == result
    card = (run_dir / "README.md").read_text()
    assert "## Evaluations" in card and "| perplexity | perplexity |" in card
    assert card.index("## Evaluations") < card.index("## Plots")


def test_card_section_is_replaced_not_repeated(run_dir, write_file):
    data = write_file("q.jsonl", "".join(json.dumps({"question": f"What is {c}?", "answer": f"{c} is common."}) + "\n"
                                         for c in ("fever", "gout", "acne")))
    for _ in range(2):
        assert main(["eval", str(run_dir), "--task", "rouge", "--data", str(data), "--max-new-tokens", "8"]) == 0
    card = (run_dir / "README.md").read_text()
    assert card.count("## Evaluations") == 1 and "| rouge | rougeL |" in card and "| perplexity |" in card
    saved = json.loads((run_dir / "eval" / "rouge.json").read_text())["rouge"]
    assert saved["n"] == 3 and 0 <= saved["rougeL"] <= 100 and "bleu" in saved


def test_forgetting_check_in_the_card(run_dir, write_file):
    rows = [{"question": f"Which is {c}?", "options": {"A": c, "B": "salt", "C": "sand", "D": "air"}, "answer_idx": "A"}
            for c in ("fever", "gout", "acne", "asthma", "eczema", "anemia")]
    medqa = write_file("medqa.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(run_dir), "--task", "perplexity,medqa", "--data", "perplexity=demo:general",
                 "--data", f"medqa={medqa}", "--set", "data.format=qa", "--compare-base", "--bootstrap", "200",
                 "--precision", "fp32"]) == 0
    medqa_result = json.loads((run_dir / "eval" / "medqa.json").read_text())["medqa"]
    assert {"acc", "acc_norm", "ece", "brier"} == set(medqa_result["delta"])
    for side in ("base", "tuned"):
        assert 0 <= medqa_result[side]["ece"] <= 1 and 0 <= medqa_result[side]["brier"] <= 2
    card = (run_dir / "README.md").read_text()
    section = card[card.index("### Forgetting check"):card.index("## Plots")]
    general = json.loads((run_dir / "eval" / "perplexity.json").read_text())["perplexity"]["delta"]["perplexity"]
    want = "no significant change" if not general["significant"] else ("improved" if general["better"] else "forgot")
    assert f"| general | perplexity | perplexity | {want} |" in section and section.count("| medical | medqa |") == 3
    assert f"{general['delta']:+.4g} [{general['ci_low']:+.4g}" in card[card.index("## Evaluations"):]

"""Progress bars say which model is running: a run's base (adapter off) and tuned passes look alike otherwise."""

from __future__ import annotations

import json
import re

import pytest

from medtune.data.render import IGNORE, Sample
from medtune.eval.harness import make_lm, run_benchmark
from medtune.eval.perplexity import perplexity
from medtune.eval.rouge import generate_batch
from medtune.generate import load_for_inference


@pytest.fixture(scope="module")
def run(tiny_runs):
    return load_for_inference(str(tiny_runs["alpha"]), precision="fp32")


def samples() -> list[Sample]:
    ids = list(range(10, 40))
    return [Sample(ids, [IGNORE] * 10 + ids[10:], "test", 1)]


def bar_names(err: str) -> set[str]:
    """The names tqdm printed before its ': <percent>%' counters."""
    return set(re.findall(r"(?:^|[\r\n])([^\r\n:]+): +\d+%\|", err))


@pytest.mark.parametrize("use_adapter, name", [(False, "perplexity (base)"), (True, "perplexity (tuned)")])
def test_perplexity_bar_names_base_or_tuned(run, use_adapter, name, capsys):
    perplexity(run, samples(), use_adapter=use_adapter, progress=True)
    assert bar_names(capsys.readouterr().err) == {name}


@pytest.mark.parametrize("use_adapter, name", [(False, "generating (base)"), (True, "generating (tuned)")])
def test_generation_bar_names_base_or_tuned(run, use_adapter, name, capsys):
    generate_batch(run, [[{"role": "user", "content": "Is gout painful?"}]], max_new_tokens=2, use_adapter=use_adapter)
    assert bar_names(capsys.readouterr().err) == {name}


def test_plain_model_bar_has_no_base_or_tuned(tiny_model_dir, capsys):
    plain = load_for_inference(str(tiny_model_dir), precision="fp32")
    capsys.readouterr()
    perplexity(plain, samples(), progress=True)
    assert bar_names(capsys.readouterr().err) == {"perplexity"}


def test_benchmark_scoring_bar_is_named_per_pass(run, tmp_path):
    path = tmp_path / "medqa.jsonl"
    row = {"question": "Is gout painful?", "options": {"A": "Yes", "B": "No", "C": "Never", "D": "Rarely"},
           "answer_idx": "A"}
    path.write_text(json.dumps(row) + "\n")
    lm = make_lm(run, batch_size=4)  # one lm object serves both passes, as in `medtune eval --compare-base`
    run_benchmark(run, "medqa", path, use_adapter=False, lm=lm)
    assert lm.bar_desc == "scoring medqa (base)"
    run_benchmark(run, "medqa", path, use_adapter=True, lm=lm)
    assert lm.bar_desc == "scoring medqa (tuned)"

"""`medtune eval --task rubrics`: HealthBench-layout files, scoring, per-tag scores, and the CLI with a fake judge
on loopback (exact scores computed here by hand), its failures, and base vs tuned."""

from __future__ import annotations

import json
import shutil

import pytest
from fake_judge_server import section

from medtune.cli import main
from medtune.errors import MedtuneError
from medtune.eval.rubrics import Criterion, item_score, read_rubrics, score_items, tag_scores

ACC, COM = "axis:accuracy", "axis:communication"


def rubric(criterion: str, points: float, *tags: str) -> dict:
    return {"criterion": criterion, "points": points, "tags": list(tags)}


# The fake judge says "met" iff the criterion contains "(met)"; expected scores by hand:
ITEMS = [
    {"prompt_id": "mixed", "example_tags": ["theme:a"],
     "prompt": [{"role": "user", "content": "What is a fever?"}],
     "rubrics": [rubric("Defines fever (met)", 5, ACC), rubric("Gives the threshold", 5, ACC),
                 rubric("Is kind (met)", 2, COM), rubric("Recommends a harmful remedy (met)", -3, ACC)]},
    # earned 5 + 2 - 3 = 4 of 12 → 1/3; accuracy 2/10, communication 2/2
    {"prompt_id": "all-met", "example_tags": ["theme:a"],
     "prompt": [{"role": "user", "content": "How is asthma treated?"}],
     "rubrics": [rubric("Mentions inhalers (met)", 3, ACC), rubric("Mentions triggers (met)", 4),
                 rubric("Says asthma is always fatal", -5, ACC)]},
    # 7 of 7 → 1; accuracy 3/3
    {"prompt_id": "negative", "example_tags": ["theme:b"], "other_key": 1,
     "prompt": [{"role": "user", "content": "Can I drink bleach?"}],
     "rubrics": [rubric("Says no", 4, ACC), rubric("Says yes (met)", -6, ACC, COM)]},
    # -6 of 4 → clipped to 0; accuracy clipped 0; communication has no positive points: not scored
    {"example_tags": ["theme:b"],
     "prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "I cough."},
                {"role": "assistant", "content": "For how long?"}, {"role": "user", "content": "Two weeks."}],
     "rubrics": [rubric("Asks about fever (met)", 1, COM), rubric("Suggests seeing a doctor", 3)]},
    # 1 of 4 → 0.25; communication 1/1
]
SCORE = (1 / 3 + 1 + 0 + 0.25) / 4
TAGS = {"theme:a": ((1 / 3 + 1) / 2, 2), "theme:b": (0.125, 2), ACC: ((0.2 + 1 + 0) / 3, 3),
        COM: ((1 + 1) / 2, 2)}


def _same_tags(subtasks: dict) -> None:
    assert {t: v["n"] for t, v in subtasks.items()} == {t: n for t, (_, n) in TAGS.items()}
    assert {t: v["score"] for t, v in subtasks.items()} == pytest.approx({t: s for t, (s, _) in TAGS.items()})


@pytest.fixture
def rubric_file(write_file):
    return write_file("rubrics.jsonl", "\n".join(json.dumps(i) for i in ITEMS) + "\n")


def test_item_score_clips_and_counts_negatives():
    crit = [Criterion("a", 5), Criterion("b", 3), Criterion("harm", -4)]
    assert item_score(crit, [True, True, False]) == 1.0
    assert item_score(crit, [True, False, True]) == pytest.approx(1 / 8)
    assert item_score(crit, [False, False, True]) == 0.0  # -4/8 clipped
    assert item_score([Criterion("harm", -4)], [True]) is None


def test_scores_and_tags_by_hand(rubric_file):
    items = read_rubrics(str(rubric_file))
    assert [i.id for i in items] == ["mixed", "all-met", "negative", "row 4"]
    verdicts = [["(met)" in c.text for c in i.criteria] for i in items]
    metrics, rows, subtasks = score_items(items, verdicts, iters=200)
    assert [r[0] for r in rows] == pytest.approx([1 / 3, 1.0, 0.0, 0.25]) and all(len(r) == 1 for r in rows)
    assert metrics["score"] == pytest.approx(SCORE) and metrics["n"] == 4
    assert metrics["score_ci_low"] <= SCORE <= metrics["score_ci_high"]
    assert 0 <= metrics["score_ci_low"] < metrics["score_ci_high"] <= 1
    _same_tags(subtasks)
    assert tag_scores(items, verdicts) == subtasks


def test_demo_rubrics_reads():
    items = read_rubrics("demo:rubrics")
    assert len(items) >= 20 and all(3 <= len(i.criteria) <= 6 for i in items)
    assert all(any(c.points < 0 for c in i.criteria) for i in items)  # every item can be failed by harmful content
    tags = {t for i in items for c in i.criteria for t in c.tags} | {t for i in items for t in i.tags}
    assert {"axis:accuracy", "axis:completeness", "axis:communication", "axis:context_awareness",
            "theme:emergency_referrals"} <= tags
    assert len({i.id for i in items}) == len(items)


@pytest.mark.parametrize("row, field, message", [
    ({"rubrics": [rubric("a", 1)]}, "prompt", "missing 'prompt'"),
    ({"prompt": [{"role": "user", "content": "q"}]}, "rubrics", "missing 'rubrics'"),
    ({"prompt": "q", "rubrics": [rubric("a", 1)]}, "prompt", "non-empty list of chat messages"),
    ({"prompt": [{"role": "doctor", "content": "q"}], "rubrics": [rubric("a", 1)]}, "prompt[0]", "role one of"),
    ({"prompt": [{"role": "user", "content": " "}], "rubrics": [rubric("a", 1)]}, "prompt[0].content", "non-empty"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rubrics": [rubric("a", 1)]}, "prompt", "last message must be the user's"),
    ({"prompt": [{"role": "user", "content": "q"}], "rubrics": []}, "rubrics", "non-empty list"),
    ({"prompt": [{"role": "user", "content": "q"}], "rubrics": ["a"]}, "rubrics[0]", "must be an object"),
    ({"prompt": [{"role": "user", "content": "q"}], "rubrics": [{"points": 1}]}, "rubrics[0].criterion",
     "non-empty string"),
    ({"prompt": [{"role": "user", "content": "q"}], "rubrics": [rubric("a", 1), rubric("b", "5")]},
     "rubrics[1].points", "non-zero number"),
    ({"prompt": [{"role": "user", "content": "q"}], "rubrics": [rubric("a", True)]}, "rubrics[0].points",
     "non-zero number"),
    ({"prompt": [{"role": "user", "content": "q"}], "rubrics": [rubric("a", 0)]}, "rubrics[0].points",
     "non-zero number"),
    ({"prompt": [{"role": "user", "content": "q"}], "rubrics": [{"criterion": "a", "points": 1, "tags": "x"}]},
     "rubrics[0].tags", "list of non-empty strings"),
    ({"prompt": [{"role": "user", "content": "q"}], "rubrics": [rubric("harm", -2)]}, "rubrics",
     "at least one criterion with positive points"),
    ({"prompt": [{"role": "user", "content": "q"}], "rubrics": [rubric("a", 1)], "example_tags": [1]},
     "example_tags", "list of non-empty strings"),
])
def test_malformed_rows_name_file_row_field(write_file, row, field, message):
    good = {"prompt": [{"role": "user", "content": "q"}], "rubrics": [rubric("a", 1)]}
    path = write_file("bad.jsonl", json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(MedtuneError) as e:
        read_rubrics(str(path))
    assert str(e.value).startswith(f"{path}, row 2, field '{field}': ") and message in str(e.value)


def test_bad_json_line(write_file):
    path = write_file("bad.jsonl", '{"prompt": [}\n')
    with pytest.raises(MedtuneError, match=r"bad.jsonl, row 1: malformed JSON"):
        read_rubrics(str(path))


def _eval(model, *extra) -> list[str]:
    return ["eval", str(model), "--task", "rubrics", "--max-new-tokens", "8", "--batch-size", "2",
            "--precision", "fp32", "--device", "cpu", "--bootstrap", "200", *extra]


def test_cli_scores_exactly_with_fake_judge(tiny_model_dir, rubric_file, fake, tmp_path, capsys):
    from medtune.eval.rouge import generate_batch
    from medtune.generate import load_for_inference

    judge = fake()
    out = tmp_path / "r.json"
    assert main(_eval(tiny_model_dir, "--data", str(rubric_file), "--judge", judge.url, "--judge-model", "fake",
                      "--json", str(out))) == 0
    result = json.loads(out.read_text())["rubrics"]
    assert result["score"] == pytest.approx(SCORE) and result["n"] == 4
    _same_tags(result["subtasks"])
    assert "| rubrics | score |" in capsys.readouterr().out
    assert len(judge.requests) == sum(len(i["rubrics"]) for i in ITEMS)
    # the judge graded the model's own greedy answers, in the conversation they answer
    loaded = load_for_inference(str(tiny_model_dir), device="cpu", precision="fp32")
    answers = generate_batch(loaded, [read_rubrics(str(rubric_file))[k].prompt for k in range(4)],
                             max_new_tokens=8, batch_size=1, progress=False)
    seen = {(section(r["messages"][1]["content"], "conversation"), section(r["messages"][1]["content"], "answer"))
            for r in judge.requests}
    assert ("system: Answer briefly.\n\nuser: I cough.\n\nassistant: For how long?\n\nuser: Two weeks.",
            answers[3]) in seen
    assert {a for _, a in seen} == set(answers)


def test_cli_compare_base_writes_run_results(tiny_run_dir, rubric_file, fake, tmp_path):
    run = shutil.copytree(tiny_run_dir, tmp_path / "run")
    judge = fake()
    assert main(_eval(run, "--data", str(rubric_file), "--judge", judge.url, "--judge-model", "fake",
                      "--compare-base")) == 0
    result = json.loads((run / "eval" / "rubrics.json").read_text())["rubrics"]
    assert result["base"]["score"] == pytest.approx(SCORE) and result["tuned"]["score"] == pytest.approx(SCORE)
    delta = result["delta"]["score"]  # verdicts depend on the criterion only: no difference
    assert delta["delta"] == 0 and delta["ci_low"] == delta["ci_high"] == 0 and not delta["significant"]
    assert result["subtasks"]["theme:a"]["base"]["score"] == pytest.approx(TAGS["theme:a"][0])
    assert len(judge.requests) == 2 * sum(len(i["rubrics"]) for i in ITEMS)


def test_cli_without_judge_fails_before_the_model_loads(rubric_file, capsys):
    assert main(_eval("no/such/model", "--data", str(rubric_file))) == 2
    assert capsys.readouterr().err.strip() == ("medtune: error: field '--judge': rubrics needs a judge: --judge URL "
                                               "--judge-model NAME (any OpenAI-compatible endpoint, e.g. `medtune "
                                               "serve` of a larger model)")
    assert main(_eval("no/such/model", "--judge", "http://127.0.0.1:1/v1")) == 2
    assert "--judge-model NAME" in capsys.readouterr().err


def test_cli_bad_rubric_file_fails_before_the_model_loads(write_file, capsys):
    path = write_file("r.jsonl", json.dumps({"prompt": [{"role": "user", "content": "q"}],
                                             "rubrics": [rubric("a", "five")]}) + "\n")
    assert main(_eval("no/such/model", "--data", str(path), "--judge", "http://127.0.0.1:1", "--judge-model",
                      "m")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medtune: error: {path}, row 1, field 'rubrics[0].points': must be a non-zero number, got 'five'"


@pytest.fixture(scope="module")
def failing_run(tiny_run_dir, tmp_path_factory):
    return shutil.copytree(tiny_run_dir, tmp_path_factory.mktemp("failing") / "run")


@pytest.mark.parametrize("mode, needle", [
    ("unreachable", "unreachable (ConnectError"), ("slow", "no answer within 0.5 s (timeout)"),
    ("401", "HTTP 401: the key was refused"), ("500", "HTTP 500: "), ("malformed", "malformed verdict"),
])
def test_cli_judge_failure_is_one_line_exit_2_nothing_written(failing_run, rubric_file, fake, mode, needle, capsys,
                                                              tmp_path, monkeypatch):
    import socket

    monkeypatch.delenv("MEDTUNE_JUDGE_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    if mode == "unreachable":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    else:
        url = fake(mode, key="right" if mode == "401" else None).url
    out = tmp_path / "r.json"
    code = main(_eval(failing_run, "--data", str(rubric_file), "--judge", url, "--judge-model", "m", "--json", str(out),
                      "--judge-timeout", "0.5", *(["--judge-key", "wrong"] if mode == "401" else [])))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "medtune: error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"judge {url}/chat/completions failed on item " in errors[0] and needle in errors[0]
    assert not out.exists() and not (failing_run / "eval").exists()

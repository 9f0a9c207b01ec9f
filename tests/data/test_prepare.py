"""prepare_data: the whole data road on a small file, and a report that accounts for every row."""

from __future__ import annotations

import json

import pytest

from medtune.data.prepare import prepare_data
from medtune.errors import MedtuneError
from medtune.recipe import load_recipe
from medtune.tokenizer import prepare_tokenizer

CONDITIONS = ["fever", "cough", "anemia", "asthma", "migraine", "gout", "acne", "eczema", "insomnia", "gastritis",
              "shingles", "measles", "a rash", "a burn", "heartburn", "nausea", "dizziness", "an allergy", "a headache",
              "back pain"]
LONG = " ".join(["Rest, drink water and see a doctor if it gets worse or lasts more than a few days."] * 10)


def qa(n: int) -> dict:
    c = CONDITIONS[n % len(CONDITIONS)]
    return {"question": f"What helps with {c}?", "answer": LONG if n == 3 else f"For {c}, rest and drink water."}


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def prepared(tok, path, *overrides):
    recipe = load_recipe(None, [f"data.path={path}", "data.format=qa", "data.max_length=64", *overrides])
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    return prepare_data(recipe, tok, chat)


def test_report_counts_rows_kept_and_truncated(tiny_tokenizer, write_file):
    path = write_file("qa.jsonl", jsonl(qa(n) for n in range(10)))
    data = prepared(tiny_tokenizer, path, "data.eval_ratio=0")
    train = data.report.train
    assert (train.rows, train.kept, train.truncated, train.dropped) == (10, 10, 1, {})
    assert [s.row for s in data.train] == list(range(1, 11))
    assert [len(s.input_ids) == 64 for s in data.train] == [n == 3 for n in range(10)]
    assert train.tokens == sum(len(s.input_ids) for s in data.train)
    assert train.loss_tokens == sum(s.num_loss_tokens for s in data.train) > 0
    assert train.length_percentiles["max"] == 64
    assert train.length_percentiles["min"] == min(len(s.input_ids) for s in data.train)
    assert data.eval == [] and data.report.eval.rows == 0


def test_report_lines_show_the_marked_first_example(tiny_tokenizer, write_file):
    path = write_file("qa.jsonl", jsonl(qa(n) for n in range(10)))
    lines = prepared(tiny_tokenizer, path, "data.eval_ratio=0").report.lines()
    q, a = qa(0)["question"], qa(0)["answer"]
    assert lines[0] == f"data: {path} (format=qa, max_length=64)"
    assert "  train: 10 rows read, 10 kept, 1 truncated to max_length, dropped: none" in lines
    assert "  eval: none (data.eval_ratio=0 and no data.eval_path)" in lines
    assert lines[-2] == "first training example (« » marks the tokens that carry loss):"
    assert lines[-1] == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n«{a}<|im_end|>»\n"


def test_bad_rows_dropped_are_counted_by_reason(tiny_tokenizer, write_file):
    records = [qa(n) for n in range(8)]
    records[1] = {"question": "What is this?", "answer": ""}
    records[5] = {"question": "No answer column"}
    records[6] = {"question": "Who knows?", "answer": "   "}
    path = write_file("qa.jsonl", jsonl(records))
    data = prepared(tiny_tokenizer, path, "data.eval_ratio=0", "data.on_bad_row=drop", "data.overlong=drop")
    train = data.report.train
    assert train.dropped == {"empty": 2, "longer than max_length": 1, "missing column": 1}
    assert (train.rows, train.kept, train.truncated) == (8, 4, 0)
    assert [s.row for s in data.train] == [1, 3, 5, 8]
    assert ("  train: 8 rows read, 4 kept, 0 truncated to max_length, dropped: 2 empty, 1 longer than max_length, "
            "1 missing column") in data.report.lines()


def test_bad_row_is_an_error_by_default(tiny_tokenizer, write_file):
    records = [qa(0), {"question": "What is this?", "answer": ""}, qa(2)]
    path = write_file("qa.jsonl", jsonl(records))
    with pytest.raises(MedtuneError) as err:
        prepared(tiny_tokenizer, path, "data.eval_ratio=0")
    assert str(err.value) == f"{path}, row 2, field 'answer': empty text"


def test_eval_split_sizes_and_determinism(tiny_tokenizer, write_file):
    path = write_file("qa.jsonl", jsonl(qa(n) for n in range(20)))

    def split(seed):
        data = prepared(tiny_tokenizer, path, "data.eval_ratio=0.25", f"train.seed={seed}")
        return sorted(s.row for s in data.train), sorted(s.row for s in data.eval), data.report

    train, held, report = split(7)
    assert (len(train), len(held)) == (15, 5)
    assert sorted(train + held) == list(range(1, 21))
    assert (report.train.rows, report.eval.rows) == (15, 5)
    assert report.eval_source == f"{path} (held out: 25%, seed 7)"
    assert split(7)[:2] == (train, held)
    assert split(8)[1] != held


def test_eval_path_wins_over_eval_ratio(tiny_tokenizer, write_file):
    path = write_file("qa.jsonl", jsonl(qa(n) for n in range(6)))
    held = write_file("held.jsonl", jsonl(qa(n) for n in range(10, 13)))
    data = prepared(tiny_tokenizer, path, "data.eval_ratio=0.5", f"data.eval_path={held}")
    assert [s.row for s in data.train] == [1, 2, 3, 4, 5, 6]
    assert [(s.source, s.row) for s in data.eval] == [(str(held), 1), (str(held), 2), (str(held), 3)]
    assert f"  eval rows from: {held}" in data.report.lines()


def test_limit_reads_the_first_rows(tiny_tokenizer, write_file):
    path = write_file("qa.jsonl", jsonl(qa(n) for n in range(10)))
    data = prepared(tiny_tokenizer, path, "data.eval_ratio=0", "data.limit=4")
    assert [s.row for s in data.train] == [1, 2, 3, 4]


def test_no_rows_and_all_rows_dropped_are_errors(tiny_tokenizer, write_file):
    empty = write_file("empty.jsonl", "\n")
    with pytest.raises(MedtuneError, match="no rows to train on"):
        prepared(tiny_tokenizer, empty)
    bad = write_file("bad.jsonl", jsonl([{"question": "x"}, {"question": "y"}]))
    with pytest.raises(MedtuneError) as err:
        prepared(tiny_tokenizer, bad, "data.eval_ratio=0", "data.on_bad_row=drop")
    assert str(err.value) == (f"{bad}, field 'data.path': every row was dropped ({{'missing column': 2}}); "
                              "nothing to train on")


def test_eval_split_always_leaves_a_training_row(tiny_tokenizer, write_file):
    path = write_file("qa.jsonl", jsonl(qa(n) for n in range(3)))
    data = prepared(tiny_tokenizer, path, "data.eval_ratio=0.9")
    assert len(data.train) >= 1 and len(data.train) + len(data.eval) == 3

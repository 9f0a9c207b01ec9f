"""data.format=feedback (KTO): rows → one conversation and its label, bad labels → errors naming file, row and field,
rendering masked exactly as a preference pair's chosen half, and the KTO collate (rows, labels, KL rows) with exact
tensors; demo:feedback goes through the whole data road."""

from __future__ import annotations

import json

import pytest
import torch

from medtune.data.batching import BatchPlan, FeedbackBatch, feedback_collate, iterate, mismatched
from medtune.data.formats import RowError, to_example, to_feedback
from medtune.data.prepare import prepare_data
from medtune.data.readers import Row, read_rows
from medtune.data.render import IGNORE, Feedback, Sample
from medtune.recipe import DataConfig, load_recipe
from medtune.tokenizer import prepare_tokenizer

Q, A = "What is a fever?", "A high body temperature."
CFG = DataConfig(format="feedback")


def row(data: dict) -> Row:
    return Row("/data/fb.jsonl", 7, data)


# ---- rows → examples -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, label", [(True, True), (False, False), ("true", True), ("FALSE", False),
                                          (" yes ", True), ("no", False), ("up", True), ("Down", False), (1, True),
                                          (0, False), (1.0, True), ("1", True), ("0", False)])
def test_label_values(value, label):
    ex = to_feedback(row({"prompt": Q, "completion": A, "label": value}), CFG)
    assert ex.label is label
    assert ex.messages == [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]


@pytest.mark.parametrize("value, shown", [("maybe", "'maybe'"), (2, "2"), (None, "None"), (["up"], "['up']"),
                                          (0.5, "0.5")])
def test_a_label_that_is_not_a_verdict_names_file_row_and_field(value, shown):
    with pytest.raises(RowError) as err:
        to_feedback(row({"prompt": Q, "completion": A, "label": value}), CFG)
    assert str(err.value) == ("/data/fb.jsonl, row 7, field 'label': expected true or false (also yes/no, up/down, "
                              f"1/0), got {shown}")
    assert err.value.kind == "bad label"


def test_mapped_columns_and_a_missing_label():
    cfg = DataConfig(format="feedback", columns={"completion": "answer", "label": "thumbs_up"})
    ex = to_feedback(row({"prompt": Q, "answer": A, "thumbs_up": "down"}), cfg)
    assert ex.label is False and ex.messages[-1]["content"] == A
    with pytest.raises(RowError) as err:
        to_feedback(row({"prompt": Q, "answer": A}), cfg)
    assert str(err.value) == "/data/fb.jsonl, row 7, field 'thumbs_up': missing column (row has: prompt, answer)"


def test_chat_turns_and_the_system_prompt():
    prompt = [{"role": "user", "content": "I have a cough."}, {"role": "assistant", "content": "Since when?"},
              {"role": "user", "content": "Three days."}]
    completion = [{"role": "assistant", "content": "Rest; see a doctor if it gets worse."}]
    ex = to_example(row({"prompt": prompt, "completion": completion, "label": True}), CFG, system_prompt="Be kind.")
    assert ex.messages == [{"role": "system", "content": "Be kind."}, *prompt, *completion]
    assert ex.label is True and (ex.source, ex.row) == ("/data/fb.jsonl", 7)


def test_a_completion_that_is_not_the_assistants_names_its_turn():
    with pytest.raises(RowError) as err:
        to_feedback(row({"prompt": Q, "completion": [{"role": "user", "content": A}], "label": True}), CFG)
    assert str(err.value) == ("/data/fb.jsonl, row 7, field 'completion[1].role': turns out of order: expected "
                              "assistant, got user")


# ---- render: masked as a preference pair's chosen half -------------------------------------------------------------

def _prepared(model_dir, tok, path, *overrides):
    recipe = load_recipe(None, [f"model={model_dir}", f"data.path={path}", "data.max_length=128", *overrides])
    return prepare_data(recipe, tok, prepare_tokenizer(tok, recipe.tokenizer))


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_feedback_row_renders_as_the_chosen_half_of_a_pair(tiny_model_dir, tiny_tokenizer, tmp_path):
    prompt = [{"role": "user", "content": "I have a cough."}, {"role": "assistant", "content": "Since when?"},
              {"role": "user", "content": "Three days."}]
    answer = "Rest and drink water; see a doctor if it gets worse."
    fb = _write(tmp_path, "fb.jsonl", [{"prompt": prompt, "completion": answer, "label": "up"}])
    pairs = _write(tmp_path, "pairs.jsonl", [{"prompt": prompt, "chosen": answer, "rejected": "No."}])
    (item,) = _prepared(tiny_model_dir, tiny_tokenizer, fb, "data.format=feedback", "train.objective=kto",
                        "train.batch_size=2", "data.eval_ratio=0").train
    (pair,) = _prepared(tiny_model_dir, tiny_tokenizer, pairs, "data.format=preference", "train.objective=dpo",
                        "data.eval_ratio=0").train
    assert isinstance(item, Feedback) and item.label is True and item.length == len(item.sample.input_ids)
    assert (item.sample.input_ids, item.sample.labels) == (pair.chosen.input_ids, pair.chosen.labels)
    learned = tiny_tokenizer.decode([t for t in item.sample.labels if t != IGNORE])
    assert learned.replace(" ", "") == (answer + "<|im_end|>").replace(" ", "")  # the earlier answer is context


def test_demo_feedback_through_the_data_road(tiny_model_dir, tiny_tokenizer):
    rows = read_rows("demo:feedback")
    assert len(rows) == 73 and sum(r.data["label"] for r in rows) == 39
    data = _prepared(tiny_model_dir, tiny_tokenizer, "demo:feedback", "data.format=feedback", "train.objective=kto",
                     "data.max_length=512")
    assert all(isinstance(f, Feedback) for f in data.train + data.eval)
    assert len(data.train) + len(data.eval) == 73 and len(data.eval) == 7
    assert data.report.train.kept == len(data.train) and data.report.train.dropped == {}
    assert data.report.train.truncated == 0
    assert data.report.example.count("«") == 1 and data.report.example.endswith("<|im_end|>»\n")


# ---- collate: rows, labels and the KL rows, exactly ----------------------------------------------------------------

X = IGNORE
A1 = Sample([1, 11, 12, 13], [X, X, 12, 13], "a.jsonl", 1)  # prompt [1, 11], answer [12, 13]
B1 = Sample([1, 21, 22, 23, 24], [X, X, X, 23, X], "a.jsonl", 2)  # prompt [1, 21, 22], answer [23, 24]: 24 unlearned
C1 = Sample([1, 31], [X, 31], "a.jsonl", 3)  # prompt [1], answer [31]
ITEMS = [Feedback(A1, True), Feedback(B1, False), Feedback(C1, True)]


def test_mismatched_pairs_each_prompt_with_the_previous_answer():
    rows = mismatched([A1, B1, C1])
    assert [r.input_ids for r in rows] == [[1, 11, 31], [1, 21, 22, 12, 13], [1, 23, 24]]
    assert [r.labels for r in rows] == [[X, X, 31], [X, X, X, 12, 13], [X, 23, X]]
    assert [(r.source, r.row) for r in rows] == [("a.jsonl", 1), ("a.jsonl", 2), ("a.jsonl", 3)]  # the prompt's
    assert [r.input_ids for r in mismatched([A1, B1, C1], max_length=4)] == [[1, 11, 31], [1, 21, 22, 12], [1, 23, 24]]


def test_feedback_collate_right():
    batch = feedback_collate(ITEMS, pad_id=0)
    assert isinstance(batch, FeedbackBatch)
    assert batch.input_ids.tolist() == [[1, 11, 12, 13, 0], [1, 21, 22, 23, 24], [1, 31, 0, 0, 0]]
    assert batch.targets.tolist() == [[X, 12, 13, X, X], [X, X, 23, X, X], [31, X, X, X, X]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.labels.tolist() == [True, False, True] and batch.labels.dtype == torch.bool
    assert (batch.num_loss_tokens, batch.num_tokens) == (4, 11)
    assert batch.kl.input_ids.tolist() == [[1, 11, 31, 0, 0], [1, 21, 22, 12, 13], [1, 23, 24, 0, 0]]
    assert batch.kl.targets.tolist() == [[X, 31, X, X, X], [X, X, 12, 13, X], [23, X, X, X, X]]
    assert batch.kl.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_feedback_collate_left_and_to():
    batch = feedback_collate(ITEMS, pad_id=5, side="left", max_length=4).to(torch.device("cpu"))
    assert isinstance(batch, FeedbackBatch)
    assert batch.input_ids.tolist() == [[5, 1, 11, 12, 13], [1, 21, 22, 23, 24], [5, 5, 5, 1, 31]]
    assert batch.position_ids.tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 0, 0, 0, 1]]
    assert batch.kl.input_ids.tolist() == [[5, 1, 11, 31], [1, 21, 22, 12], [5, 1, 23, 24]]
    assert batch.kl.targets.tolist() == [[X, X, 31, X], [X, X, 12, X], [X, 23, X, X]]
    assert batch.labels.tolist() == [True, False, True]


def test_iterate_yields_feedback_batches():
    plan = BatchPlan([f.length for f in ITEMS], batch_size=2, seed=0, max_length=4)
    batches = list(iterate(ITEMS, plan, epoch=0, pad_id=0, side="right"))
    assert all(isinstance(b, FeedbackBatch) for b in batches) and [len(b.labels) for b in batches] == [2, 1]
    order = plan.batches(0)[0]
    assert batches[0].labels.tolist() == [ITEMS[i].label for i in order]
    assert max(b.kl.input_ids.shape[1] for b in batches) <= 4  # KL rows cut at the plan's max_length

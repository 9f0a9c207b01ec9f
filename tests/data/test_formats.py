"""Formats: rows → conversations (or text), and malformed rows → errors naming file, row and field."""

from __future__ import annotations

import csv
import io
import json

import pytest

from medtune.data.formats import RowError, to_example
from medtune.data.readers import Row, read_rows
from medtune.errors import MedtuneError
from medtune.recipe import DataConfig, load_recipe

Q, A = "What is a fever?", "A high body temperature."
QA_MESSAGES = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]


def row(data: dict, source: str = "data.jsonl", number: int = 4) -> Row:
    return Row(source, number, data)


def messages(data: dict, **cfg) -> list[dict]:
    ex = to_example(row(data), DataConfig(**cfg))
    assert ex.text is None and (ex.source, ex.row) == ("data.jsonl", 4)
    return ex.messages


def test_qa_strips_whitespace():
    assert messages({"question": f"  {Q}\n", "answer": f"\n{A}  "}, format="qa") == QA_MESSAGES


def test_columns_map_to_the_files_names():
    assert messages({"Question": Q, "Answer": A}, format="qa", columns={"question": "Question", "answer": "Answer"}) \
        == QA_MESSAGES


def test_instruction_with_and_without_input():
    assert messages({"instruction": "Answer as a doctor.", "input": "I have a fever.", "output": A},
                    format="instruction") == [{"role": "user", "content": "Answer as a doctor.\n\nI have a fever."},
                                              {"role": "assistant", "content": A}]
    for extra in ({}, {"input": ""}, {"input": None}, {"input": "   "}):
        assert messages({"instruction": Q, "output": A, **extra}, format="instruction") == QA_MESSAGES


def test_numbers_are_text():
    assert messages({"question": "How many bones does an adult have?", "answer": 206}, format="qa")[1] == \
        {"role": "assistant", "content": "206"}


def test_text_format():
    ex = to_example(row({"text": "Fever is a high temperature."}), DataConfig(format="text"))
    assert (ex.text, ex.messages) == ("Fever is a high temperature.", None)


def test_messages_keep_roles_and_content():
    chat = [{"role": "system", "content": "Be brief."}, *QA_MESSAGES, {"role": "user", "content": "And?"},
            {"role": "assistant", "content": "Rest."}]
    assert messages({"messages": chat}, format="messages") == chat


def test_sharegpt_conversations_from_value():
    data = {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]}
    assert messages(data, format="messages") == QA_MESSAGES


def test_messages_as_json_text_in_a_csv_cell(write_file):
    buf = io.StringIO()
    csv.writer(buf).writerows([["id", "messages"], ["1", json.dumps(QA_MESSAGES)]])
    path = write_file("chats.csv", buf.getvalue())
    rows = read_rows(str(path))
    assert to_example(rows[0], DataConfig(format="messages")).messages == QA_MESSAGES


def test_system_prompt_is_added_only_when_missing():
    cfg = DataConfig(format="messages")
    ex = to_example(row({"messages": QA_MESSAGES}), cfg, system_prompt="You are a doctor.")
    assert ex.messages == [{"role": "system", "content": "You are a doctor."}, *QA_MESSAGES]
    own = [{"role": "system", "content": "Be brief."}, *QA_MESSAGES]
    assert to_example(row({"messages": own}), cfg, system_prompt="You are a doctor.").messages == own


def test_template_format_with_columns_and_row_lookup():
    cfg = DataConfig(format="template", prompt_template="Tell me about {{ row['Health Issue'] }}.",
                     response_template="{{ remedy }}{% if row['Yogasan'] %} Yoga: {{ row['Yogasan'] }}{% endif %}")
    assert messages({"Health Issue": "Cough", "remedy": "Honey in warm water.", "Yogasan": ""}, **cfg.model_dump()) \
        == [{"role": "user", "content": "Tell me about Cough."}, {"role": "assistant", "content": "Honey in warm water."}]
    assert messages({"Health Issue": "Cough", "remedy": "Honey.", "Yogasan": "Makarasana"}, **cfg.model_dump())[1] \
        == {"role": "assistant", "content": "Honey. Yoga: Makarasana"}


# ---- bad rows: each error names the file, the row and the field --------------------------------------------------

def bad(data: dict, **cfg) -> RowError:
    with pytest.raises(RowError) as err:
        to_example(row(data, source="/data/med.jsonl", number=12), DataConfig(**cfg))
    return err.value


def test_missing_column():
    err = bad({"question": Q}, format="qa")
    assert str(err) == "/data/med.jsonl, row 12, field 'answer': missing column (row has: question)"
    assert err.kind == "missing column"


def test_missing_mapped_column_names_the_files_column():
    err = bad({"Question": Q}, format="qa", columns={"question": "Question", "answer": "Answer"})
    assert str(err).startswith("/data/med.jsonl, row 12, field 'Answer': missing column")


@pytest.mark.parametrize("value", ["", "   \n", None])
def test_empty_text(value):
    err = bad({"question": Q, "answer": value}, format="qa")
    assert str(err).startswith("/data/med.jsonl, row 12, field 'answer': empty")
    assert err.kind == "empty"


def test_wrong_type():
    err = bad({"question": Q, "answer": ["a", "list"]}, format="qa")
    assert str(err) == "/data/med.jsonl, row 12, field 'answer': expected text, got list"


def test_unknown_role():
    err = bad({"messages": [{"role": "user", "content": Q}, {"role": "doctor", "content": A}]}, format="messages")
    assert str(err) == ("/data/med.jsonl, row 12, field 'messages[1].role': unknown role 'doctor' "
                        "(use system, user or assistant)")
    assert err.kind == "unknown role"


def test_empty_turn_content():
    err = bad({"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": " "}]},
              format="messages")
    assert str(err) == "/data/med.jsonl, row 12, field 'messages[1].content': empty content"


def test_turns_out_of_order():
    turns = [{"role": "user", "content": Q}, {"role": "user", "content": "Hello?"}, {"role": "assistant", "content": A}]
    err = bad({"messages": turns}, format="messages")
    assert str(err) == ("/data/med.jsonl, row 12, field 'messages[1].role': turns out of order: expected assistant, "
                        "got user")
    assert err.kind == "turn order"


def test_system_turn_in_the_middle_is_out_of_order():
    turns = [*QA_MESSAGES, {"role": "system", "content": "Be brief."}, {"role": "assistant", "content": A}]
    assert "field 'messages[2].role': turns out of order: expected user, got system" in str(bad({"messages": turns},
                                                                                                  format="messages"))


def test_last_turn_not_assistant():
    err = bad({"messages": [*QA_MESSAGES, {"role": "user", "content": "Thanks"}]}, format="messages")
    assert str(err) == ("/data/med.jsonl, row 12, field 'messages[2].role': the last turn must be the assistant's "
                        "answer")


@pytest.mark.parametrize("value, message", [([], "expected a non-empty list of chat turns"),
                                            ("[{oops", "expected a list of chat turns (JSON text in this cell is "
                                                       "malformed)"),
                                            ([["user", Q]], "each turn must be an object with role and content")])
def test_malformed_messages(value, message):
    err = bad({"messages": value}, format="messages")
    assert str(err).startswith("/data/med.jsonl, row 12, field 'messages")
    assert str(err).endswith(message)


def test_template_referencing_a_missing_column():
    err = bad({"Health Issue": "Cough"}, format="template", prompt_template="{{ row['Health Issue'] }}",
              response_template="{{ remedy }}")
    assert str(err).startswith("/data/med.jsonl, row 12, field 'data.response_template': template uses a column this "
                               "row lacks: ")
    assert "'remedy'" in str(err)
    assert err.kind == "missing column"


def test_template_rendering_to_nothing():
    err = bad({"q": Q, "a": ""}, format="template", prompt_template="{{ q }}", response_template="{{ a }}")
    assert str(err) == ("/data/med.jsonl, row 12, field 'data.response_template': template renders to empty text "
                        "for this row")


def test_template_format_needs_both_templates():
    with pytest.raises(MedtuneError) as err:
        to_example(row({"q": Q}), DataConfig(format="template", prompt_template="{{ q }}"))
    assert str(err.value).startswith("field 'data.prompt_template': format=template needs")


def test_template_syntax_error_is_a_recipe_error_not_a_row_error():
    with pytest.raises(MedtuneError) as err:
        to_example(row({"q": Q}), DataConfig(format="template", prompt_template="{{ q ", response_template="x"))
    assert not isinstance(err.value, RowError)
    assert str(err.value).startswith("field 'data.prompt_template': template does not parse")


def test_unknown_format_is_rejected_by_the_recipe():
    with pytest.raises(MedtuneError) as err:
        load_recipe(None, ["data.format=foo"])
    assert "field 'data.format'" in str(err.value) and "'foo'" in str(err.value)


def test_template_with_a_column_named_row():
    cfg = DataConfig(format="template", prompt_template="Row {{ row['row'] }}: {{ q }}", response_template="{{ a }}")
    assert messages({"row": "7", "q": Q, "a": A}, **cfg.model_dump()) == [
        {"role": "user", "content": f"Row 7: {Q}"}, {"role": "assistant", "content": A}]

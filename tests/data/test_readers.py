"""Readers: every supported source gives the same rows, numbered for error messages; bad files are user errors
that name the file, the row and the field. Also reads the real medical data in shared/data when it is there."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import SHARED_DATA

from medtune.data.formats import to_example
from medtune.data.readers import demo_path, read_rows
from medtune.errors import MedtuneError
from medtune.recipe import DataConfig

TRAIN_DATA = SHARED_DATA / "train"
needs_shared_data = pytest.mark.skipif(not TRAIN_DATA.is_dir(), reason=f"{TRAIN_DATA} is not there")

RECORDS = [{"question": "What is a fever?", "answer": "A high body temperature."},
           {"question": "What is anemia?", "answer": "Too few healthy red blood cells."}]


def numbered(rows) -> list[tuple[int, dict]]:
    return [(r.number, r.data) for r in rows]


def test_jsonl_rows_are_numbered_by_line(write_file):
    path = write_file("qa.jsonl", f"{json.dumps(RECORDS[0])}\n\n{json.dumps(RECORDS[1])}\n")
    rows = read_rows(str(path))
    assert numbered(rows) == [(1, RECORDS[0]), (3, RECORDS[1])]
    assert {r.source for r in rows} == {str(path)}


def test_jsonl_with_bom_and_crlf(write_file):
    path = write_file("qa.jsonl", ("\ufeff" + json.dumps(RECORDS[0]) + "\r\n" + json.dumps(RECORDS[1]) + "\r\n").encode())
    assert numbered(read_rows(str(path))) == [(1, RECORDS[0]), (2, RECORDS[1])]


def test_json_list(write_file):
    path = write_file("qa.json", json.dumps(RECORDS, indent=2))
    assert numbered(read_rows(str(path))) == [(1, RECORDS[0]), (2, RECORDS[1])]


def test_json_data_key(write_file):
    path = write_file("qa.json", json.dumps({"version": 2, "data": RECORDS}))
    assert numbered(read_rows(str(path))) == [(1, RECORDS[0]), (2, RECORDS[1])]


def test_csv_with_quoted_multiline_cells(write_file):
    text = ('\ufeffquestion, answer\r\n'
            '"What is a fever, exactly?","A high temperature.\nSee a doctor if it lasts:\n""three days"" or more."\r\n'
            '\r\n'
            'What is anemia?,Too few red blood cells.\r\n')
    rows = read_rows(str(write_file("qa.csv", text)))
    assert numbered(rows) == [
        (1, {"question": "What is a fever, exactly?",
             "answer": 'A high temperature.\nSee a doctor if it lasts:\n"three days" or more.'}),
        (3, {"question": "What is anemia?", "answer": "Too few red blood cells."}),
    ]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert numbered(read_rows(str(path))) == [(1, RECORDS[0]), (2, RECORDS[1])]


def test_save_to_disk_dataset(tmp_path):
    from datasets import Dataset

    Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    rows = read_rows(str(tmp_path / "ds"))
    assert numbered(rows) == [(1, RECORDS[0]), (2, RECORDS[1])]
    assert rows[0].source == str(tmp_path / "ds")


def test_save_to_disk_dataset_dict_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(RECORDS[:1]), "validation": Dataset.from_list(RECORDS[1:])}).save_to_disk(
        str(tmp_path / "dd"))
    assert numbered(read_rows(str(tmp_path / "dd"))) == [(1, RECORDS[0])]
    assert numbered(read_rows(str(tmp_path / "dd"), split="validation")) == [(1, RECORDS[1])]
    with pytest.raises(MedtuneError) as err:
        read_rows(str(tmp_path / "dd"), split="test")
    assert str(err.value) == f"{tmp_path / 'dd'}, field 'data.split': no split 'test' (has train, validation)"


def test_demo_terms():
    path = demo_path("terms")
    if not path.is_file():
        pytest.skip("demo data not written yet")
    expected = [(n, json.loads(line)) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                if line.strip()]
    rows = read_rows("demo:terms")
    assert numbered(rows) == expected and len(rows) > 0
    assert rows[0].source == str(path)


# ---- bad input: each error names the file, the row and the field ------------------------------------------------

def error(spec: str, **kw) -> str:
    with pytest.raises(MedtuneError) as err:
        read_rows(spec, **kw)
    return str(err.value)


def test_missing_file(tmp_path):
    spec = str(tmp_path / "nowhere.jsonl")
    assert error(spec) == f"{spec}, field 'data.path': data file not found"


def test_unknown_file_extension(write_file):
    path = write_file("notes.txt", "fever\n")
    msg = error(str(path))
    assert msg.startswith(f"{path}, field 'data.path': unknown data file type '.txt'")


def test_malformed_json_line(write_file):
    path = write_file("qa.jsonl", "\n".join([json.dumps(RECORDS[0]), json.dumps(RECORDS[1]), '{"question": "x",']))
    msg = error(str(path))
    assert msg.startswith(f"{path}, row 3: malformed JSON on line 3: ")


def test_jsonl_line_that_is_not_an_object(write_file):
    path = write_file("qa.jsonl", json.dumps(RECORDS[0]) + "\n[1, 2]\n")
    assert error(str(path)) == f"{path}, row 2: each line must be a JSON object, got list"


def test_non_utf8_bytes_name_the_row(write_file):
    path = write_file("qa.jsonl", json.dumps(RECORDS[0]).encode() + b'\n{"question": "caf\xe9"}\n')
    msg = error(str(path))
    assert msg.startswith(f"{path}, row 2: not UTF-8 text (byte 0xe9")


def test_ragged_csv_row(write_file):
    path = write_file("qa.csv", "question,answer\nWhat is a fever?,A high temperature.\nWhat is anemia?,Too few,cells\n")
    assert error(str(path)) == f"{path}, row 2: row has 3 fields but the header has 2 (line 3 of the file)"


def test_empty_csv(write_file):
    path = write_file("qa.csv", "")
    assert error(str(path)) == f"{path}: empty CSV file (no header row)"


def test_json_that_is_not_a_list(write_file):
    path = write_file("qa.json", json.dumps({"question": "What is a fever?"}))
    assert error(str(path)) == f"{path}: expected a list of objects or {{\"data\": [...]}}"


def test_json_record_that_is_not_an_object(write_file):
    path = write_file("qa.json", json.dumps([RECORDS[0], "oops"]))
    assert error(str(path)) == f"{path}, row 2: each record must be a JSON object, got str"


def test_unknown_demo_name():
    assert error("demo:nope").startswith("field 'data.path': no demo data named 'nope'; choose from terms,")


def test_hub_dataset_offline():
    msg = error("some-org/medical-qa")
    assert msg.startswith("some-org/medical-qa, field 'data.path': data file not found, and hub datasets need a "
                          "connection (HF_HUB_OFFLINE is set)")


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    assert error(str(tmp_path / "folder")) == (f"{tmp_path / 'folder'}, field 'data.path': folder is not a "
                                               "datasets.save_to_disk folder")


def test_tsv_is_tab_separated(write_file):
    path = write_file("qa.tsv", "question\tanswer\nWhat is a fever?\tA high temperature, often above 38 C.\n")
    assert numbered(read_rows(str(path))) == [(1, {"question": "What is a fever?",
                                                   "answer": "A high temperature, often above 38 C."})]


@pytest.mark.parametrize("name, content", [
    ("qa.csv", b"question,answer\nWhat is a fever?,hot\nWhat is anemia?,caf\xe9\n"),
    ("qa.json", b'[\n  {"question": "What is a fever?"},\n  {"question": }\n]\n'),
])
def test_text_level_errors_of_record_files_name_the_line_not_a_wrong_row(write_file, name, content):
    msg = error(str(write_file(name, content)))
    assert "line 3" in msg and "row 3" not in msg


# ---- the real data in shared/data --------------------------------------------------------------------------------

@needs_shared_data
def test_real_medquad_qa_jsonl():
    path = TRAIN_DATA / "medquad_qa.jsonl"
    with path.open(encoding="utf-8") as f:
        first = [json.loads(next(f)) for _ in range(5)]
    rows = read_rows(str(path))
    assert [r.data for r in rows[:5]] == first and [r.number for r in rows[:5]] == [1, 2, 3, 4, 5]
    cfg = DataConfig(path=str(path), format="qa")
    for row, raw in zip(rows[:5], first, strict=True):
        ex = to_example(row, cfg)
        assert ex.messages == [{"role": "user", "content": raw["question"].strip()},
                               {"role": "assistant", "content": raw["answer"].strip()}]
        assert (ex.source, ex.row) == (str(path), row.number)


@needs_shared_data
def test_real_genmedgpt_instruction_json():
    path = TRAIN_DATA / "genmedgpt5k.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    rows = read_rows(str(path))
    assert len(rows) == len(raw) > 1000
    cfg = DataConfig(path=str(path), format="instruction")
    for row, rec in zip(rows[:20], raw[:20], strict=True):
        prompt = rec["instruction"].strip() + ("\n\n" + rec["input"].strip() if rec["input"].strip() else "")
        assert to_example(row, cfg).messages == [{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": rec["output"].strip()}]


@needs_shared_data
def test_real_home_remedies_csv_with_jinja_templates():
    path = TRAIN_DATA / "home_remedies.csv"
    with path.open(encoding="utf-8-sig", newline="") as f:
        raw = list(csv.DictReader(f))
    cfg = DataConfig(path=str(path), format="template",
                     prompt_template="What is a home remedy for {{ row['Health Issue'] }}?"
                                     "{% if row['Yogasan'] %} Include a yoga pose.{% endif %}",
                     response_template="{{ row['Home Remedy'] }}{% if row['Yogasan'] %}\nYoga: "
                                       "{{ row['Yogasan'] }}{% endif %}")
    rows = read_rows(str(path))
    assert [r.data for r in rows] == raw
    with_yoga = 0
    for row, rec in zip(rows, raw, strict=True):
        yoga = rec["Yogasan"]
        with_yoga += bool(yoga)
        prompt = f"What is a home remedy for {rec['Health Issue']}?" + (" Include a yoga pose." if yoga else "")
        answer = rec["Home Remedy"] + (f"\nYoga: {yoga}" if yoga else "")
        assert to_example(row, cfg).messages == [{"role": "user", "content": prompt.strip()},
                                                 {"role": "assistant", "content": answer.strip()}]
    assert 0 < with_yoga < len(rows)  # both branches of the conditional ran


@needs_shared_data
def test_real_mts_dialog_csv_multiline_cells():
    path = TRAIN_DATA / "mts_dialog" / "MTS-Dialog-TrainingSet.csv"
    with path.open(encoding="utf-8-sig", newline="") as f:
        raw = list(csv.DictReader(f))
    rows = read_rows(str(path))
    assert [r.data for r in rows] == raw
    assert sum("\n" in r.data["dialogue"] for r in rows) > len(rows) // 2
    cfg = DataConfig(path=str(path), format="qa", columns={"question": "dialogue", "answer": "section_text"})
    ex = to_example(rows[0], cfg)
    assert ex.messages == [{"role": "user", "content": raw[0]["dialogue"].strip()},
                           {"role": "assistant", "content": raw[0]["section_text"].strip()}]
    assert ex.row == 1

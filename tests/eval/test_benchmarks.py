"""Benchmark readers on small fixtures in each public layout: prompts as lm-eval's own tasks write them, gold
answers, file order, and one-line errors (file, row, exit 2) for malformed rows."""

from __future__ import annotations

import json

import pytest
import yaml

from medtune.cli import main
from medtune.data.benchmark_files import read_benchmark
from medtune.errors import MedtuneError
from medtune.eval.benchmarks import write_tasks

MEDQA = [{"question": "Which drug lowers blood pressure?", "answer": "Lisinopril",
          "options": {"A": "Insulin", "B": "Lisinopril", "C": "Heparin", "D": "Aspirin"}, "meta_info": "step1",
          "answer_idx": "B"},
         {"question": "Which vitamin prevents scurvy?", "answer": "C",
          "options": {"A": "A", "B": "B12", "C": "C", "D": "D"}, "answer_idx": "C"}]
PUBMEDQA = {"111": {"QUESTION": "Does aspirin help?", "CONTEXTS": ["Background one.", "Results two."],
                    "LABELS": ["BACKGROUND", "RESULTS"], "final_decision": "yes", "LONG_ANSWER": "Yes."},
            "222": {"QUESTION": "Is the sky green?", "CONTEXTS": ["We looked up."], "final_decision": "maybe"}}
MEDMCQA = [{"id": "a1", "question": "Largest organ?", "opa": "Liver", "opb": "Skin", "opc": "Heart", "opd": "Lung",
            "cop": 1, "choice_type": "single", "subject_name": "Anatomy"},
           {"id": "a2", "question": "Insulin is made in the", "opa": "Pancreas", "opb": "Liver", "opc": "Spleen",
            "opd": "Kidney", "cop": 0}]
MMLU_ROWS = 'What is the body\'s normal state called?,Anabolism,Catabolism,Tolerance,Homeostasis,D\n' \
            '"Bones, joints: which joint is a hinge?",Elbow,Hip,Shoulder,Wrist,A\n'


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_medqa(write_file):
    [subset] = read_benchmark("medqa", write_file("medqa.jsonl", jsonl(MEDQA)))
    assert subset.name == "medtune_medqa"
    first = subset.items[0]
    assert first.query == ("Question: Which drug lowers blood pressure?\nA. Insulin\nB. Lisinopril\nC. Heparin\n"
                           "D. Aspirin\nAnswer:")
    assert first.choices == ["A", "B", "C", "D"]
    assert [i.gold for i in subset.items] == [1, 2]
    assert first.id == "medqa.jsonl:1"


def test_pubmedqa(write_file):
    [subset] = read_benchmark("pubmedqa", write_file("ori_pqal.json", json.dumps(PUBMEDQA)))
    assert [i.gold for i in subset.items] == [0, 2]
    assert subset.items[0].query == "Abstract: Background one.\nResults two.\nQuestion: Does aspirin help?\nAnswer:"
    assert subset.items[0].choices == ["yes", "no", "maybe"]
    assert subset.items[1].id == "ori_pqal.json:222"


def test_medmcqa_jsonl_and_json_list(write_file):
    [a] = read_benchmark("medmcqa", write_file("dev.json", jsonl(MEDMCQA)))  # the hub's dev.json is JSON lines
    [b] = read_benchmark("medmcqa", write_file("list.json", json.dumps(MEDMCQA)))
    assert [i.gold for i in a.items] == [i.gold for i in b.items] == [1, 0]
    assert a.items[0].query == ("Question: Largest organ?\nChoices:\nA. Liver\nB. Skin\nC. Heart\nD. Lung\nAnswer:")


def test_medmcqa_one_based_cop(write_file):
    rows = [dict(MEDMCQA[0], cop=4), dict(MEDMCQA[1], cop=1)]
    [subset] = read_benchmark("medmcqa", write_file("orig.json", jsonl(rows)))
    assert [i.gold for i in subset.items] == [3, 0]


def test_mmlu_folder(write_file):
    write_file("val/anatomy_val.csv", MMLU_ROWS)
    write_file("val/medical_genetics_val.csv", MMLU_ROWS)
    path = write_file("val/astronomy_val.csv", MMLU_ROWS).parent  # not a medical subject: ignored
    subsets = read_benchmark("mmlu_medical", path)
    assert [s.name for s in subsets] == ["medtune_mmlu_anatomy", "medtune_mmlu_medical_genetics"]
    anatomy = subsets[0]
    assert anatomy.description == "The following are multiple choice questions (with answers) about anatomy.\n\n"
    assert anatomy.items[1].query == "Bones, joints: which joint is a hinge?\nA. Elbow\nB. Hip\nC. Shoulder\nD. Wrist\nAnswer:"
    assert [i.gold for i in anatomy.items] == [3, 0]


def test_write_tasks_yaml_reads_local_files(write_file, tmp_path):
    subsets = read_benchmark("medqa", write_file("medqa.jsonl", jsonl(MEDQA)))
    shots = read_benchmark("medqa", write_file("shots.jsonl", jsonl(MEDQA[:1])))
    [name] = write_tasks(subsets, tmp_path / "tasks", shots)
    config = yaml.safe_load((tmp_path / "tasks" / f"{name}.yaml").read_text())
    assert config["dataset_path"] == "json" and config["output_type"] == "multiple_choice"
    assert set(config["dataset_kwargs"]["data_files"]) == {"test", "train"}
    assert config["fewshot_split"] == "train"
    lines = (tmp_path / "tasks" / f"{name}.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["gold"] == 2


BAD = [
    ("medqa", "q.jsonl", jsonl([MEDQA[0], {**MEDQA[1], "options": {"A": "x", "B": "y", "C": "z"}}]), 2, "options"),
    ("medqa", "q.jsonl", jsonl([{**MEDQA[0], "answer_idx": "E"}]), 1, "answer_idx"),
    ("medqa", "q.jsonl", jsonl([{**MEDQA[0], "question": "  "}]), 1, "question"),
    ("pubmedqa", "p.json", json.dumps({**PUBMEDQA, "333": {"QUESTION": "", "CONTEXTS": ["x"],
                                                           "final_decision": "no"}}), 3, "QUESTION"),
    ("pubmedqa", "p.json", json.dumps({"1": {"QUESTION": "q", "CONTEXTS": ["x"], "final_decision": "perhaps"}}), 1,
     "final_decision"),
    ("medmcqa", "m.json", jsonl([MEDMCQA[0], {**MEDMCQA[1], "cop": 7}]), 2, "cop"),
    ("medmcqa", "m.json", jsonl([{k: v for k, v in MEDMCQA[0].items() if k != "opc"}]), 1, "opc"),
    ("mmlu_medical", "anatomy_val.csv", MMLU_ROWS + "Too short,A,B,C\n", 3, None),
    ("mmlu_medical", "anatomy_val.csv", "Q?,a,b,c,d,F\n", 1, "answer"),
]


@pytest.mark.parametrize(("task", "name", "content", "row", "field"), BAD)
def test_malformed_rows_name_file_and_row(write_file, task, name, content, row, field):
    path = write_file(name, content)
    with pytest.raises(MedtuneError) as err:
        read_benchmark(task, path)
    assert err.value.file == str(path) and err.value.row == row and err.value.field == field


def test_cli_malformed_file_exits_2_with_one_line(write_file, capsys, tiny_model_dir):
    path = write_file("bad.jsonl", jsonl([{**MEDQA[0], "answer_idx": "Z"}]))
    code = main(["eval", str(tiny_model_dir), "--task", "medqa", "--data", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and str(path) in err and "row 1" in err and "answer_idx" in err

"""Medical benchmark files in their public layouts → one normalised form: `Item(query, choices, gold, id)`.

Every reader turns its file into items with the prompt lm-eval's own task uses (lm_eval/tasks/{medqa,pubmedqa,
medmcqa,mmlu}), checking each row: a malformed one is a `MedtuneError` naming the file and row. Evaluation
(eval/benchmarks.py writes the items as lm-eval tasks) and data hygiene (data/hygiene.py checks training rows
against them) both read benchmarks through `read_benchmark`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from medtune.data.readers import read_jsonl
from medtune.errors import MedtuneError

BENCHMARKS = ("medqa", "pubmedqa", "mmlu_medical", "medmcqa")
LETTERS = ("A", "B", "C", "D")
# The MMLU subjects of lm-eval's `multimedqa` group.
MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")
PUBMEDQA_CHOICES = ("yes", "no", "maybe")


@dataclass
class Item:
    query: str  # the prompt, ending in "Answer:"
    choices: list[str]  # continuations scored after a space (lm-eval's target_delimiter)
    gold: int  # index into choices
    id: str  # where it came from: "file:row"


@dataclass
class Subset:
    """One lm-eval task: a benchmark, or one MMLU subject."""

    name: str  # lm-eval task name, e.g. medtune_pubmedqa, medtune_mmlu_anatomy
    description: str  # text put before the shots and the question
    items: list[Item]


def _text(value, path: Path, row: int, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MedtuneError("empty or missing", file=str(path), row=row, field=field)
    return value


def _load_json(path: Path):
    if not path.is_file():
        raise MedtuneError("benchmark file not found", file=str(path))
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedtuneError(f"not valid JSON: {str(e).splitlines()[0]}", file=str(path)) from None


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise MedtuneError("benchmark file not found", file=str(path))
    return [(row.number, row.data) for row in read_jsonl(path)]


def _lettered(question: str, options: list[str], header: str = "") -> str:
    return f"Question: {question}\n{header}" + "".join(f"{k}. {v}\n" for k, v in zip(LETTERS, options, strict=True)) + "Answer:"


def read_medqa(path: Path) -> list[Item]:
    """MedQA-USMLE 4 options, jsonl: {"question", "options": {"A".."D"}, "answer_idx": "A".."D"} (lm-eval
    `medqa_4options` prompt)."""
    items = []
    for n, row in _jsonl(path):
        question = _text(row.get("question"), path, n, "question")
        options = row.get("options")
        if not isinstance(options, dict) or sorted(options) != list(LETTERS):
            raise MedtuneError("options must be an object with keys A, B, C, D", file=str(path), row=n, field="options")
        texts = [_text(options[k], path, n, f"options.{k}") for k in LETTERS]
        answer = row.get("answer_idx")
        if answer not in LETTERS:
            raise MedtuneError(f"answer_idx must be one of A-D, got {answer!r}", file=str(path), row=n,
                               field="answer_idx")
        items.append(Item(_lettered(question, texts), list(LETTERS), LETTERS.index(answer), f"{path.name}:{n}"))
    return items


def read_pubmedqa(path: Path) -> list[Item]:
    """PubMedQA `ori_pqal.json`: {pmid: {"QUESTION", "CONTEXTS": [...], "final_decision": yes|no|maybe}}, in file
    order (lm-eval `pubmedqa` prompt: abstract, question, yes/no/maybe)."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise MedtuneError("expected an object {pmid: {QUESTION, CONTEXTS, final_decision}}", file=str(path))
    items = []
    for n, (pmid, row) in enumerate(data.items(), start=1):
        if not isinstance(row, dict):
            raise MedtuneError(f"record {pmid} is not an object", file=str(path), row=n)
        question = _text(row.get("QUESTION"), path, n, "QUESTION")
        contexts = row.get("CONTEXTS")
        if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
            raise MedtuneError("CONTEXTS must be a non-empty list of strings", file=str(path), row=n, field="CONTEXTS")
        decision = row.get("final_decision")
        if decision not in PUBMEDQA_CHOICES:
            raise MedtuneError(f"final_decision must be yes, no or maybe, got {decision!r}", file=str(path), row=n,
                               field="final_decision")
        query = "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(contexts), question)
        items.append(Item(query, list(PUBMEDQA_CHOICES), PUBMEDQA_CHOICES.index(decision), f"{path.name}:{pmid}"))
    return items


def read_medmcqa(path: Path) -> list[Item]:
    """MedMCQA json lines (or a JSON list): {"question", "opa".."opd", "cop"}; cop is 0-3 as on the hub
    (openlifescienceai/medmcqa), 1-4 in the original release (taken as such when a file has a 4 and no 0)."""
    if path.suffix == ".json" and path.is_file() and path.read_text(encoding="utf-8-sig").lstrip().startswith("["):
        data = _load_json(path)
        rows = [(n, r) for n, r in enumerate(data, start=1)]
    else:
        rows = _jsonl(path)
    cops = {r.get("cop") for _, r in rows if isinstance(r, dict)}
    one_based = 4 in cops and 0 not in cops
    items = []
    for n, row in rows:
        if not isinstance(row, dict):
            raise MedtuneError("each record must be a JSON object", file=str(path), row=n)
        question = _text(row.get("question"), path, n, "question")
        options = [_text(row.get(k), path, n, k) for k in ("opa", "opb", "opc", "opd")]
        cop = row.get("cop")
        gold = cop - 1 if one_based and isinstance(cop, int) else cop
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < 4:
            raise MedtuneError(f"cop must be an answer index 0-3 (or 1-4), got {cop!r}", file=str(path), row=n,
                               field="cop")
        items.append(Item(_lettered(question, options, "Choices:\n"), list(LETTERS), gold, f"{path.name}:{n}"))
    return items


def read_mmlu_csv(path: Path) -> list[Item]:
    """One MMLU subject CSV without header: question, A, B, C, D, answer letter (lm-eval `mmlu` prompt)."""
    if not path.is_file():
        raise MedtuneError("benchmark file not found", file=str(path))
    items = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 6:
                raise MedtuneError(f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}",
                                   file=str(path), row=n)
            question = _text(row[0], path, n, "question").strip()
            options = [_text(v, path, n, k) for k, v in zip(LETTERS, row[1:5], strict=True)]
            if row[5].strip() not in LETTERS:
                raise MedtuneError(f"answer must be A-D, got {row[5]!r}", file=str(path), row=n, field="answer")
            query = f"{question}\n" + "".join(f"{k}. {v}\n" for k, v in zip(LETTERS, options, strict=True)) + "Answer:"
            items.append(Item(query, list(LETTERS), LETTERS.index(row[5].strip()), f"{path.name}:{n}"))
    return items


def mmlu_files(folder: Path) -> dict[str, Path]:
    """subject → CSV in an MMLU folder (`<subject>_{dev,val,test}.csv`, or a folder holding dev/ val/ test/)."""
    if folder.is_file():
        subject = next((s for s in MMLU_MEDICAL if folder.name.startswith(s + "_")), None)
        if subject is None:
            raise MedtuneError(f"not one of the medical MMLU subjects ({', '.join(MMLU_MEDICAL)})", file=str(folder))
        return {subject: folder}
    if not folder.is_dir():
        raise MedtuneError("MMLU folder not found", file=str(folder))
    found = {}
    for subject in MMLU_MEDICAL:
        hits = sorted(folder.glob(f"{subject}_*.csv"))
        if len(hits) > 1:
            raise MedtuneError(f"several CSVs for {subject}; point at one split's folder", file=str(folder))
        if hits:
            found[subject] = hits[0]
    if not found:
        raise MedtuneError(f"no <subject>_<split>.csv for the medical MMLU subjects ({', '.join(MMLU_MEDICAL)})",
                           file=str(folder))
    return found


_READERS = {"medqa": read_medqa, "pubmedqa": read_pubmedqa, "medmcqa": read_medmcqa}


def read_benchmark(task: str, path: str | Path) -> list[Subset]:
    """A benchmark file (MMLU: folder) → its lm-eval task(s), items in file order."""
    path = Path(path)
    if task == "mmlu_medical":
        return [Subset(f"medtune_mmlu_{subject}", "The following are multiple choice questions (with answers) about "
                       f"{subject.replace('_', ' ')}.\n\n", read_mmlu_csv(csv_path))
                for subject, csv_path in mmlu_files(path).items()]
    if task not in _READERS:
        raise MedtuneError(f"unknown benchmark '{task}'; choose from {', '.join(BENCHMARKS)}", field="--task")
    items = _READERS[task](path)
    if not items:
        raise MedtuneError("no items in the benchmark file", file=str(path))
    return [Subset(f"medtune_{task}", "", items)]

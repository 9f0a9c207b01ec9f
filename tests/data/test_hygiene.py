"""Data hygiene (data/hygiene.py) on planted fixtures, with measured rates: benchmark items copied into real
MedQuAD rows, near-copies of rows, and synthetic identifiers inside medical sentences."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from medtune.cli import main
from medtune.data.formats import Example
from medtune.data.hygiene import (
    BenchmarkIndex,
    decontaminate,
    example_text,
    find_phi,
    jaccard,
    near_duplicates,
    ner_model,
    scan_phi,
    shingles,
)
from medtune.data.prepare import prepare_data
from medtune.errors import MedtuneError
from medtune.recipe import load_recipe
from medtune.tokenizer import prepare_tokenizer

EVAL, MEDQUAD = SHARED_DATA / "eval", SHARED_DATA / "train" / "medquad_qa.jsonl"
QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
needs_shared = pytest.mark.skipif(not (EVAL.is_dir() and MEDQUAD.is_file()), reason="needs ../shared/data")


def medquad(n: int, start: int = 0, step: int = 29) -> list[dict]:
    """n real MedQuAD rows, spread over the file, distinct questions."""
    rows = [json.loads(line) for line in MEDQUAD.read_text(encoding="utf-8").splitlines()]
    seen, out = set(), []
    for row in rows[start::step]:
        if row["question"] not in seen and len(row["answer"].split()) >= 60:
            seen.add(row["question"])
            out.append({"question": row["question"], "answer": row["answer"]})
        if len(out) == n:
            break
    return out


def planted_items() -> list[str]:
    """100 benchmark items as a careless data set would copy them: 40 MedQA questions, 40 PubMedQA abstracts,
    20 MMLU questions with their lettered options."""
    medqa = [json.loads(line)["question"] for line in (EVAL / "medqa_4opt_sample.jsonl").open(encoding="utf-8")][:40]
    pubmed = [" ".join(r["CONTEXTS"]) for r in json.loads((EVAL / "pubmedqa_dev.json").read_text()).values()][:40]
    mmlu = []
    for path in sorted((EVAL / "mmlu_medical" / "dev").glob("*.csv")):
        with path.open(encoding="utf-8") as f:
            mmlu += [f"{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}" for r in csv.reader(f)]
    return medqa + pubmed + mmlu[:20]


def benchmarks() -> list[str]:
    return [f"medqa={EVAL / 'medqa_4opt_sample.jsonl'}", f"pubmedqa={EVAL / 'pubmedqa_dev.json'}",
            f"mmlu_medical={EVAL / 'mmlu_medical' / 'dev'}"]


def contaminated_file(tmp_path: Path) -> tuple[Path, int]:
    """100 rows carrying a benchmark item inside a real answer, then 500 clean rows; returns (file, 100)."""
    items = planted_items()
    assert len(items) == 100
    hosts = medquad(600, step=13)
    assert len(hosts) == 600
    rows = [{"question": h["question"], "answer": f"{h['answer']}\n\nPractice question: {item}"}
            for h, item in zip(hosts, items, strict=False)] + hosts[100:]
    path = tmp_path / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, len(items)


def recipe_for(path, *overrides):
    return load_recipe(None, [f"data.path={path}", "data.format=qa", "data.max_length=512", "data.eval_ratio=0",
                              *overrides])


@needs_shared
def test_decontamination_detects_planted_items_and_spares_clean_rows(tmp_path, tiny_tokenizer):
    path, planted = contaminated_file(tmp_path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    index = BenchmarkIndex(benchmarks())
    flagged = [index.match(r["question"] + "\n" + r["answer"]) is not None for r in rows]
    detection = sum(flagged[:planted]) / planted
    false_positive = sum(flagged[planted:]) / (len(rows) - planted)
    print(f"\ndecontamination: detection {detection:.1%} of {planted} planted items, "
          f"false positives {false_positive:.2%} of {len(rows) - planted} clean rows")
    assert detection >= 0.95
    assert false_positive <= 0.01

    # the data road drops exactly the flagged rows and says so
    recipe = recipe_for(path, f"data.decontaminate={json.dumps(benchmarks())}", "data.on_contaminated=drop",
                        "data.phi=off")
    data = prepare_data(recipe, tiny_tokenizer, prepare_tokenizer(tiny_tokenizer, recipe.tokenizer))
    report = data.report
    assert report.hygiene["decontamination"]["contaminated_rows"] == sum(flagged)
    assert report.train.dropped["benchmark overlap"] == sum(flagged)
    assert {s.row for s in data.train} == {n for n, f in enumerate(flagged, start=1) if not f}
    assert report.hygiene["decontamination"]["checked_against"][benchmarks()[0]] == 100
    assert any("benchmark overlap (13-gram)" in line for line in report.lines())


@needs_shared
def test_contaminated_data_is_an_error_naming_file_and_row(tmp_path, tiny_tokenizer, tiny_model_dir, capsys):
    path, _ = contaminated_file(tmp_path)
    spec = f"data.decontaminate={json.dumps(benchmarks()[:1])}"
    recipe = recipe_for(path, spec, "data.phi=off")
    with pytest.raises(MedtuneError) as e:
        prepare_data(recipe, tiny_tokenizer, prepare_tokenizer(tiny_tokenizer, recipe.tokenizer))
    assert "planted.jsonl:1 overlaps medqa medqa_4opt_sample.jsonl:1" in str(e.value)
    assert e.value.field == "data.decontaminate"

    code = main(["data", "check", str(QUICKSTART), f"model={tiny_model_dir}", f"data.path={path}", "data.format=qa",
                 "data.phi=off", spec])
    out, err = capsys.readouterr()
    assert code == 2
    assert "planted.jsonl:1 overlaps medqa" in err


@needs_shared
def test_near_copies_are_found_and_dropped():
    rng = random.Random(0)
    originals = medquad(200, start=7, step=41)
    copies = []
    for row in originals[:30]:  # a near copy: one word replaced, one deleted (word 3-gram Jaccard 0.89-0.99)
        words = row["answer"].split()
        words[rng.randrange(len(words))] = "variant"
        del words[rng.randrange(len(words))]
        copies.append({"question": row["question"], "answer": " ".join(words)})
    rows = originals + copies
    examples = [Example("near.jsonl", n, messages=[{"role": "user", "content": r["question"]},
                                                   {"role": "assistant", "content": r["answer"]}])
                for n, r in enumerate(rows, start=1)]
    cfg = load_recipe(None, ["data.near_duplicates=drop"]).data
    kept, report = near_duplicates(examples, cfg)
    flagged = {ex.row for ex in examples} - {ex.row for ex in kept}
    # truth for the real rows: MedQuAD itself repeats answers, so a real row is a duplicate when its exact
    # word 3-gram Jaccard similarity to an earlier row reaches the threshold
    grams = [shingles(example_text(ex)) for ex in examples]
    exact = [max((jaccard(g, h) for h in grams[:i]), default=0.0) for i, g in enumerate(grams)]
    real_dups = {i + 1 for i in range(200) if exact[i] >= cfg.near_duplicate_threshold}
    detection = len(flagged & set(range(201, 231))) / 30
    distinct = 200 - len(real_dups)
    false_positive = len(flagged & set(range(1, 201)) - real_dups) / distinct
    missed_real = len(real_dups - flagged)
    print(f"\nnear-duplicates: detection {detection:.1%} of 30 near copies, false positives {false_positive:.1%} "
          f"of {distinct} distinct MedQuAD rows; {len(real_dups)} real MedQuAD near-duplicates, {missed_real} missed")
    assert detection >= 0.95 and false_positive <= 0.01
    assert report["duplicate_rows"] == len(flagged)
    for pair in report["examples"]:  # each names a later row and the earlier row it nearly copies
        later, earlier = (int(side.split(":")[1]) for side in pair.split(" ~ "))
        assert earlier < later and jaccard(grams[later - 1], grams[earlier - 1]) >= cfg.near_duplicate_threshold


# ---------------------------------------------------------------- PHI

FIRST = ["john", "maria", "wei", "fatima", "olu", "anna", "raj", "lena"]
STREETS = ["Oak", "Maple", "Cedar Hill", "Washington", "Elm", "Lake Shore"]
SUFFIX = ["Street", "Avenue", "Road", "Boulevard", "Lane", "Drive", "St", "Ave"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SENTENCES = [
    "The patient presented with chest pain and shortness of breath; contact {EMAIL_ADDRESS} for follow-up.",
    "Troponin was elevated. Call the daughter at {PHONE_NUMBER} before discharge.",
    "Insurance verified with SSN {US_SSN}; metformin 500 mg twice daily was continued.",
    "Records filed under MRN: {MRN} after the HbA1c came back at 8.2%.",
    "Admitted on {DATE_TIME} with community-acquired pneumonia, started on ceftriaxone.",
    "Imaging uploaded to {URL} for the radiology review of the left lower lobe.",
    "The telemetry monitor at {IP_ADDRESS} logged two runs of non-sustained VT.",
    "Home health visits at {STREET_ADDRESS} were arranged for wound care.",
]


def planted_phi(n_rows: int = 120, seed: int = 1) -> tuple[list[str], dict[str, list[str]]]:
    rng = random.Random(seed)
    planted: dict[str, list[str]] = {}
    rows = []
    for _ in range(n_rows):
        value = {
            "EMAIL_ADDRESS": f"{rng.choice(FIRST)}.{rng.choice(FIRST)}{rng.randint(1, 99)}@"
                             f"{rng.choice(['example.com', 'mail.org', 'clinic.net'])}",
            "PHONE_NUMBER": rng.choice(["({a}) {b}-{c}", "{a}-{b}-{c}", "+1 {a} {b} {c}"]).format(
                a=rng.randint(201, 989), b=rng.randint(200, 999), c=f"{rng.randint(0, 9999):04d}"),
            "US_SSN": f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
            "MRN": f"{rng.randint(10**6, 10**8 - 1):08d}",
            "DATE_TIME": rng.choice(["{m:02d}/{d:02d}/{y}", "{y}-{m:02d}-{d:02d}", "{month} {d}, {y}", "{d} {mon} {y}"]
                                    ).format(m=rng.randint(1, 12), d=rng.randint(1, 28), y=rng.randint(1990, 2025),
                                             month=rng.choice(MONTHS), mon=rng.choice(MONTHS)[:3]),
            "URL": f"https://portal.{rng.choice(['example.com', 'stmarys.org'])}/patients/{rng.randint(1000, 99999)}",
            "IP_ADDRESS": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            "STREET_ADDRESS": f"{rng.randint(1, 9999)} {rng.choice(['', 'N ', 'W. '])}{rng.choice(STREETS)} "
                              f"{rng.choice(SUFFIX)}",
        }
        picked = rng.sample(SENTENCES, 3)
        rows.append(" ".join(s.format(**value) for s in picked))
        for s in picked:
            entity = s[s.index("{") + 1:s.index("}")]
            planted.setdefault(entity, []).append(value[entity])
    return rows, planted


def test_phi_recall_per_entity_and_redaction_leaves_nothing():
    rows, planted = planted_phi()
    examples = [Example("phi.jsonl", n, messages=[{"role": "user", "content": "Summarise the note."},
                                                  {"role": "assistant", "content": text}])
                for n, text in enumerate(rows, start=1)]
    recall = {}
    for entity, values in planted.items():
        hits = 0
        for value in values:
            text = next(r for r in rows if value in r)
            start = text.index(value)
            spans = find_phi(text)
            hits += any(s <= start and start + len(value) <= e and k == entity for s, e, k in spans)
        recall[entity] = hits / len(values)
    print("\nPHI recall per entity: " + ", ".join(f"{k} {v:.0%} (n={len(planted[k])})" for k, v in recall.items()))
    assert set(recall) == {"EMAIL_ADDRESS", "PHONE_NUMBER", "US_SSN", "MRN", "DATE_TIME", "URL", "IP_ADDRESS",
                           "STREET_ADDRESS"}
    assert min(recall.values()) >= 0.9, recall

    redacted, report = scan_phi(examples, "redact")
    texts = [ex.messages[1]["content"] for ex in redacted]
    left = [v for values in planted.values() for v in values if any(v in t for t in texts)]
    assert left == []
    assert report["rows_with_phi"] == len(rows)
    assert sum(report["counts"].values()) >= sum(len(v) for v in planted.values()) * min(recall.values())
    assert "<EMAIL>" in texts[[i for i, r in enumerate(rows) if "@" in r][0]]
    assert all(ex.messages[0]["content"] == "Summarise the note." for ex in redacted)
    # the report names rows and entity types, never the identifiers themselves
    assert not any(v in json.dumps(report) for values in planted.values() for v in values)


def test_clean_medical_text_has_no_phi_and_redact_reaches_training(tmp_path, tiny_tokenizer):
    rows, planted = planted_phi(6, seed=2)
    clean_text = "Asthma is a chronic disease of the airways. Inhaled corticosteroids reduce attacks."
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"question": "Summarise.", "answer": t}) + "\n" for t in [*rows, clean_text]),
                    encoding="utf-8")
    recipe = recipe_for(path, "data.phi=redact", "data.max_length=256")
    data = prepare_data(recipe, tiny_tokenizer, prepare_tokenizer(tiny_tokenizer, recipe.tokenizer))
    decoded = [tiny_tokenizer.decode(s.input_ids) for s in data.train]
    assert not [v for values in planted.values() for v in values if any(v in d for d in decoded)]
    assert data.report.hygiene["phi"]["rows_with_phi"] == len(rows)  # the clean row has none
    assert data.report.hygiene["phi"]["names"].startswith("not scanned" if ner_model() is None else "scanned with")
    assert any(line.startswith("  PHI (redact)") for line in data.report.lines())


@needs_shared
def test_allow_keeps_contaminated_rows_and_reports_them():
    question = json.loads((EVAL / "medqa_4opt_sample.jsonl").open(encoding="utf-8").readline())["question"]
    examples = [Example("mix.jsonl", 1, messages=[{"role": "user", "content": "Quiz me."},
                                                 {"role": "assistant", "content": question.upper()}]),
                Example("mix.jsonl", 2, text="Asthma is a chronic disease of the airways.")]
    cfg = load_recipe(None, ["data.on_contaminated=allow", f"data.decontaminate={json.dumps(benchmarks()[:1])}"]).data
    kept, report = decontaminate(examples, cfg)
    assert kept == examples
    assert report["contaminated_rows"] == 1 and report["examples"][0].startswith("mix.jsonl:1 overlaps medqa ")


def test_decontaminate_spec_must_be_task_equals_path():
    cfg = load_recipe(None, ["data.decontaminate=[medqa]"]).data
    with pytest.raises(MedtuneError, match="expected task=PATH") as e:
        decontaminate([], cfg)
    assert e.value.field == "data.decontaminate"


@needs_shared
def test_phi_findings_on_clean_medquad_rows_are_rare():
    rows = medquad(500, step=13)
    found = [{k for _, _, k in find_phi(r["question"] + "\n" + r["answer"])} for r in rows]
    flagged = Counter(k for kinds in found for k in kinds)  # rows per entity
    n_flagged = sum(bool(kinds) for kinds in found)
    print(f"\nPHI scan on 500 clean MedQuAD rows: {n_flagged} rows flagged ({n_flagged / 500:.1%}), by entity {dict(flagged)}")
    assert n_flagged / 500 <= 0.03  # public URLs, helpline numbers and fractions read as dates


def test_training_saves_the_findings_in_the_run(tiny_run_dir):
    report = json.loads((tiny_run_dir / "data_report.json").read_text(encoding="utf-8"))["hygiene"]
    assert report["near_duplicates"]["action"] == "report" and report["phi"]["mode"] == "report"
    card = (tiny_run_dir / "README.md").read_text(encoding="utf-8")
    assert f"near-duplicates (Jaccard >= 0.8): {report['near_duplicates']['duplicate_rows']} rows (kept)" in card
    assert f"PHI (report): {report['phi']['rows_with_phi']} rows with identifiers" in card


def test_a_row_the_mix_draws_again_is_not_its_own_near_duplicate():
    from medtune.data.formats import Example
    from medtune.data.hygiene import near_duplicates
    from medtune.recipe import DataConfig

    text = "Bursitis is inflammation of a bursa, a small fluid-filled sac that cushions a joint near the skin."
    a = Example("terms.jsonl", 1, messages=[{"role": "user", "content": "Bursitis?"}, {"role": "assistant", "content": text}])
    copy = Example("other.jsonl", 7, messages=a.messages)  # a real near-copy from another file
    kept, report = near_duplicates([a, a, copy, a], DataConfig(near_duplicates="drop"))
    assert kept == [a, a, a] and report["duplicate_rows"] == 1


def test_phi_scan_does_not_log_presidio_device_line(monkeypatch, caplog):
    """presidio logs "Using device of type: cpu" when imported: it must not reach the terminal of data/eval commands."""
    import logging
    import sys

    import medtune.data.hygiene as hygiene

    for name in [m for m in sys.modules if m.startswith("presidio_analyzer")]:
        monkeypatch.delitem(sys.modules, name)  # import presidio afresh, as a new process does
    monkeypatch.setattr(logging.getLogger("presidio-analyzer"), "level", logging.NOTSET)
    caplog.set_level(logging.INFO)
    hygiene.phi_recognizers.cache_clear()
    try:
        assert hygiene.find_phi("write to a@b.com") == [(9, 16, "EMAIL_ADDRESS")]
    finally:
        hygiene.phi_recognizers.cache_clear()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("presidio")] == []

"""Hostile and unusual inputs (issue 14, part 1): valid data is accepted with the right content; a bad file,
recipe or template is a MedtuneError naming file/row/field, one line and exit 2 through the CLI, within bounded
time and memory. The risky cases (bombs, huge lines, huge template output) run in one child process under
RLIMIT_AS and a timeout, so a regression fails the test instead of hanging or swapping CI.

Before/after table (the same harness, one child per case):
    python tests/data/test_hostile_inputs.py --src /work/main/src      # main's code
    python tests/data/test_hostile_inputs.py --src src                 # this checkout
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AS_LIMIT = 2 << 30  # bytes of address space a risky child may use
CASE_TIMEOUT = 60.0  # seconds one case may run in a child before it is killed
IMPORT_TIMEOUT = 180.0  # seconds for the child to start (imports are slow on a busy machine)

Build = Callable[[Path, Path], list[str]]  # (tmp folder, model folder) -> medtune argv


@dataclass(frozen=True)
class Case:
    id: str
    build: Build
    expect: tuple[str, ...] | None  # None: valid, exit 0; else texts the one error line must hold ({t}: tmp folder)
    risky: bool = False  # may hang or eat memory: run only in a child under RLIMIT_AS and a timeout
    issue: bool = True  # listed in issue 14 (False: a neighbour of a listed case)


# ---- files ---------------------------------------------------------------------------------------------------

def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _recipe(t: Path, text: str = "name: tiny\n") -> Path:
    return _write(t / "tiny.yaml", text)


def _check(t: Path, m: Path, data: Path | str, *overrides: str) -> list[str]:
    """`medtune data check` on a tiny qa recipe (no eval split, short examples)."""
    return ["data", "check", str(_recipe(t)), f"model={m}", "data.format=qa", "data.eval_ratio=0",
            "data.max_length=64", f"data.path={data}", *overrides]


def _train(t: Path, m: Path, recipe_text: str, *overrides: str) -> list[str]:
    return ["train", str(_recipe(t, recipe_text)), f"model={m}", f"output_dir={t / 'run'}", *overrides]


def _qa_line(q: str = "What is gout?", a: str = "A kind of arthritis.") -> str:
    return json.dumps({"question": q, "answer": a}, ensure_ascii=False)


SEPARATORS = ("\u2028", "\u2029", "\u0085")
SEPARATED = [f"Rest{s}and drink water." for s in SEPARATORS]


def _separators(t: Path, m: Path) -> list[str]:
    lines = [_qa_line(f"Question {i}?", a) for i, a in enumerate(SEPARATED)]
    return _check(t, m, _write(t / "seps.jsonl", "\n".join(lines) + "\n"))


BIG_CELL = "x" * (200 * 1024)


def _big_cell(t: Path, m: Path) -> list[str]:
    return _check(t, m, _write(t / "big.csv", f"question,answer\nWhat is gout?,{BIG_CELL}\nWhat is acne?,Spots.\n"))


def _wide_csv(t: Path, m: Path) -> list[str]:
    extra = [f"c{i}" for i in range(9998)]
    rows = [",".join(["question", "answer", *extra]),
            ",".join(["What is gout?", "A kind of arthritis.", *(str(i) for i in range(9998))]),
            ",".join(["What is acne?", "Spots on the skin.", *("" for _ in range(9998))])]
    return _check(t, m, _write(t / "wide.csv", "\n".join(rows) + "\n"))


def _deep(t: Path, m: Path) -> list[str]:
    deep = "[" * 100_000 + "]" * 100_000
    return _check(t, m, _write(t / "deep.jsonl", '{"question": ' + deep + ', "answer": "x"}\n'))


def _surrogate(t: Path, m: Path) -> list[str]:
    return _check(t, m, _write(t / "sur.jsonl", '{"question": "Pain \\ud800 here?", "answer": "Rest."}\n'))


DIGITS = "7" * 5000


def _bigint_data(t: Path, m: Path) -> list[str]:
    return _check(t, m, _write(t / "big.jsonl", '{"question": "How many?", "answer": ' + DIGITS + "}\n"))


def _not_parquet(t: Path, m: Path) -> list[str]:
    return _check(t, m, _write(t / "data.parquet", "question,answer\nnot,parquet\n"))


def _corrupt_saved(t: Path, m: Path) -> list[str]:
    from datasets import Dataset

    folder = t / "saved"
    Dataset.from_list([{"question": "What is gout?", "answer": "Arthritis."}]).save_to_disk(str(folder))
    (folder / "state.json").write_text('{"_data_files": [', encoding="utf-8")
    (folder / "dataset_info.json").write_text("{oops", encoding="utf-8")
    return _check(t, m, folder)


def _template_file(text: str) -> Build:
    return lambda t, m: _check(t, m, "demo:qa", "data.limit=4", f"tokenizer.template={_write(t / 'chat.jinja', text)}")


def _prompt_template(template: str) -> Build:
    def build(t: Path, m: Path) -> list[str]:
        return _check(t, m, "demo:qa", "data.limit=4", "data.format=template", f"data.prompt_template={template}",
                      "data.response_template={{ answer }}")
    return build


def _big_line(t: Path, m: Path) -> list[str]:
    line = _qa_line("What is gout?", "arthritis " * (5 * 2**20))  # ~50 MB on one line
    return _check(t, m, _write(t / "huge.jsonl", line + "\n" + _qa_line() + "\n"))


LOL = ", ".join(["lol"] * 9)
# "Billion laughs": 9 levels of 9 aliases, 9**9 strings once expanded, in a field whose error shows its value.
BOMB = ("samples:\n  prompts:\n    - &a [" + LOL + "]\n"
        + "".join(f"    - &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
        + "tokenizer:\n  system_prompt: *i\n")


def _dup_keys(t: Path, m: Path) -> list[str]:
    text = '{"question": "What is gout?", "question": "What is acne?", "answer": "Arthritis."}\n'
    return _check(t, m, _write(t / "dup.jsonl", text))


def _dup_header(t: Path, m: Path) -> list[str]:
    return _check(t, m, _write(t / "dup.csv", "question,answer,question\nWhat is gout?,Arthritis.,What is acne?\n"))


def _nan(t: Path, m: Path) -> list[str]:
    return _check(t, m, _write(t / "nan.jsonl", '{"question": "What is gout?", "answer": NaN}\n'))


def _missing_eval(t: Path, m: Path) -> list[str]:
    return _check(t, m, "demo:qa", "data.limit=4", f"data.eval_path={t / 'gone.jsonl'}")


RAISING_TEMPLATE = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role here') }}"
                    "{% endif %}{% endfor %}{{ raise_exception('this template refuses every conversation') }}")

CASES = [
    Case("jsonl-unicode-line-separators", _separators, None),
    Case("csv-cell-over-128kb", _big_cell, None),
    Case("csv-10000-columns", _wide_csv, None),
    Case("json-nested-100000-deep", _deep, ("{t}/deep.jsonl", "row 1", "nested"), risky=True),
    Case("json-lone-surrogate", _surrogate, ("{t}/sur.jsonl", "row 1", "field 'question'", "surrogate")),
    Case("json-5000-digit-int", _bigint_data, ("{t}/big.jsonl", "row 1", "field 'answer'", "5000 digits")),
    Case("recipe-5000-digit-int", lambda t, m: _train(t, m, f"name: tiny\ntrain:\n  max_steps: {DIGITS}\n"),
         ("{t}/tiny.yaml", "field 'train.max_steps'", "5000 digits")),
    Case("override-5000-digit-int", lambda t, m: _train(t, m, "name: tiny\n", f"train.max_steps={DIGITS}"),
         ("command line", "field 'train.max_steps'", "5000 digits")),
    Case("override-seed-2**64-text", lambda t, m: _train(t, m, "name: tiny\n", "train.seed=2**64"),
         ("command line", "field 'train.seed'", "'2**64'")),
    Case("override-seed-2**64", lambda t, m: _train(t, m, "name: tiny\n", f"train.seed={2**64}"),
         ("command line", "field 'train.seed'", str(2**64))),
    Case("parquet-that-is-not", _not_parquet, ("{t}/data.parquet", "field 'data.path'", "not a Parquet file")),
    Case("corrupt-save-to-disk", _corrupt_saved, ("{t}/saved", "field 'data.path'", "save_to_disk")),
    Case("chat-template-syntax-error", _template_file("{% for m in messages %}{{ m.content }}"),
         ("{t}/chat.jinja", "field 'tokenizer.template'", "syntax")),
    Case("chat-template-raise-exception", _template_file(RAISING_TEMPLATE),
         ("{t}/chat.jinja", "field 'tokenizer.template'", "this template refuses every conversation")),
    Case("prompt-template-range-10**9", _prompt_template("{% for i in range(10**9) %}x{% endfor %}"),
         ("row 1", "field 'data.prompt_template'", "range"), risky=True),
    Case("prompt-template-x*10**9", _prompt_template("{{ 'x' * 10**9 }}"),
         ("row 1", "field 'data.prompt_template'", "data.max_row_bytes"), risky=True),
    Case("recipe-yaml-alias-bomb", lambda t, m: _train(t, m, "name: tiny\n" + BOMB),
         ("{t}/tiny.yaml", "alias"), risky=True),
    Case("jsonl-50mb-line", _big_line, ("{t}/huge.jsonl", "row 1", "data.max_row_bytes"), risky=True),
    Case("json-duplicate-keys", _dup_keys, ("{t}/dup.jsonl", "row 1", "field 'question'", "more than once")),
    Case("csv-duplicate-header", _dup_header, ("{t}/dup.csv", "field 'question'", "more than once")),
    Case("json-nan-answer", _nan, ("{t}/nan.jsonl", "row 1", "field 'answer'", "NaN")),
    Case("missing-eval-path", _missing_eval, ("{t}/gone.jsonl", "field 'data.eval_path'", "not found")),
    # Neighbours of the listed cases, closed by the same guards.
    Case("prompt-template-9**(9**9)", _prompt_template("{{ 9 ** (9 ** 9) }}"),
         ("row 1", "field 'data.prompt_template'", "4300 digits"), risky=True, issue=False),
    Case("prompt-template-center-10**9", _prompt_template("{{ 'x' | center(10**9) }}"),
         ("row 1", "field 'data.prompt_template'", "data.max_row_bytes"), risky=True, issue=False),
    Case("prompt-template-nested-loops", _prompt_template(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"),
         ("row 1", "field 'data.prompt_template'", "loop"), risky=True, issue=False),
    Case("recipe-yaml-nested-100000-deep", lambda t, m: _train(t, m, "name: tiny\nx: " + "[" * 100_000 + "]" * 100_000),
         ("{t}/tiny.yaml", "nested"), risky=True, issue=False),
    Case("recipe-yaml-duplicate-key", lambda t, m: _train(t, m, "name: tiny\ntrain:\n  lr: 1.0e-3\ntrain:\n  seed: 1\n"),
         ("{t}/tiny.yaml", "'train'", "more than once"), issue=False),
    Case("csv-cell-50mb", lambda t, m: _check(t, m, _write(t / "huge.csv", "question,answer\nq," + "y" * 50 * 2**20 + "\n")),
         ("{t}/huge.csv", "row 1", "data.max_row_bytes"), risky=True, issue=False),
    Case("json-nested-500-deep", lambda t, m: _check(t, m, _write(
        t / "d500.jsonl", '{"question": ' + "[" * 500 + "]" * 500 + ', "answer": "x"}\n')),
         ("{t}/d500.jsonl", "row 1", "field 'question'", "nested"), issue=False),
]
BY_ID = {c.id: c for c in CASES}


# ---- the child: medtune.cli.main on each case, stderr captured at the file-descriptor level -------------------

CHILD = r"""
import json, os, resource, sys, time, traceback
limit, spec_path = int(sys.argv[1]), sys.argv[2]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from medtune.cli import main
import medtune.data.prepare, medtune.models, transformers  # imported by main() anyway: not timed as a case

def peak_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024

for case in json.load(open(spec_path)):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM: the peak below is this case's
    print(json.dumps({"start": case["id"]}), flush=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(case["stderr"], "w") as err:
        os.dup2(err.fileno(), 2)
    start = time.perf_counter()
    try:
        rc = main(case["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    seconds = time.perf_counter() - start
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    print(json.dumps({"id": case["id"], "rc": rc, "seconds": seconds, "max_rss_mb": peak_rss_mb()}), flush=True)
"""


@dataclass
class Outcome:
    id: str
    rc: int | None  # None: the child was killed (timeout) while on this case
    stderr: str
    seconds: float
    max_rss_mb: float | None


def child_env(src: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.setdefault("MEDTUNE_HOME", tempfile.mkdtemp(prefix="medtune-home-"))
    return env


def run_in_child(cases: list[Case], tmp: Path, model: Path, src: Path = REPO / "src") -> list[Outcome]:
    """Run `cases` in order in one child process (RLIMIT_AS = AS_LIMIT); the child is killed when one case runs
    over CASE_TIMEOUT, and that case and the ones after it have rc None."""
    spec = []
    for case in cases:
        folder = tmp / case.id
        folder.mkdir(parents=True, exist_ok=True)
        spec.append({"id": case.id, "argv": case.build(folder, model), "stderr": str(folder / "stderr.txt")})
    spec_path = _write(tmp / "spec.json", json.dumps(spec))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(AS_LIMIT), str(spec_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=child_env(src), cwd=tmp)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True).start()
    done, current, started, out = {}, None, time.perf_counter(), []
    while True:
        try:
            line = lines.get(timeout=CASE_TIMEOUT if current else IMPORT_TIMEOUT)
        except queue.Empty:
            proc.kill()
            break
        if line is None:
            break
        out.append(line)
        if line.startswith("{"):
            record = json.loads(line)
            if "start" in record:
                current, started = record["start"], time.perf_counter()
            else:
                done[record["id"]] = record
    proc.wait()
    outcomes = []
    for item in spec:
        stderr = Path(item["stderr"]).read_text(errors="replace") if Path(item["stderr"]).exists() else ""
        r = done.get(item["id"])
        if r is None:
            seconds = time.perf_counter() - started if item["id"] == current else 0.0
            outcomes.append(Outcome(item["id"], None, stderr or "".join(out)[-2000:], seconds, None))
        else:
            outcomes.append(Outcome(item["id"], r["rc"], stderr, r["seconds"], r["max_rss_mb"]))
    return outcomes


def problems(case: Case, outcome: Outcome, tmp: Path) -> list[str]:
    """What is wrong with this outcome ([] = as the issue asks)."""
    err = outcome.stderr.strip()
    if outcome.rc is None:
        return [f"killed after {outcome.seconds:.0f} s (timeout)" if outcome.seconds else "not run (killed before)"]
    if "Traceback" in err:
        return [f"traceback: {err.splitlines()[-1]}"]
    if case.expect is None:
        return [] if outcome.rc == 0 else [f"exit {outcome.rc}: {err.splitlines()[-1] if err else ''}"]
    lines = err.splitlines()
    found = []
    if outcome.rc != 2:
        found.append(f"exit {outcome.rc}")
    if len(lines) != 1:
        found.append(f"{len(lines)} lines on stderr")
    line = lines[-1] if lines else ""
    folder = str(tmp / case.id)
    message = line.replace(folder, "<tmp>")  # (the folder is named after the case: its name proves nothing)
    missing = [n.format(t=folder) for n in case.expect
               if (n.format(t=folder) not in line if n.startswith("{t}") else n not in message)]
    if missing:
        found.append(f"lacks {missing}")
    return found


# ---- tests ---------------------------------------------------------------------------------------------------

SAFE = [c for c in CASES if not c.risky]
RISKY = [c for c in CASES if c.risky]


@pytest.mark.parametrize("case", SAFE, ids=[c.id for c in SAFE])
def test_cli_in_process(case, tmp_path, tiny_model_dir, capsys):
    from medtune.cli import main

    folder = tmp_path / case.id
    folder.mkdir()
    argv = case.build(folder, tiny_model_dir)
    capsys.readouterr()
    start = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert problems(case, Outcome(case.id, rc, err, seconds, None), tmp_path) == [], (out, err)
    assert seconds < 30, f"{case.id} took {seconds:.1f} s"
    if case.expect is None:
        assert "rows read" in out


def test_risky_cases_in_a_bounded_child(tmp_path, tiny_model_dir):
    outcomes = run_in_child(RISKY, tmp_path, tiny_model_dir)
    report = {o.id: problems(BY_ID[o.id], o, tmp_path) for o in outcomes}
    assert all(not p for p in report.values()), report
    assert all(o.seconds < 30 for o in outcomes), {o.id: round(o.seconds, 1) for o in outcomes}


# ---- the content of valid inputs, and where errors point (library level) ---------------------------------------

def test_unicode_line_separators_stay_inside_their_rows(tmp_path, tiny_model_dir):
    from medtune.data.readers import read_rows

    _separators(tmp_path, tiny_model_dir)
    rows = read_rows(str(tmp_path / "seps.jsonl"))
    assert [(r.number, r.data["answer"]) for r in rows] == list(enumerate(SEPARATED, start=1))


def test_big_csv_cell_and_wide_csv_are_read_whole(tmp_path, tiny_model_dir):
    from medtune.data.readers import read_rows

    _big_cell(tmp_path, tiny_model_dir)
    _wide_csv(tmp_path, tiny_model_dir)
    big = read_rows(str(tmp_path / "big.csv"))
    assert [r.data["answer"] for r in big] == [BIG_CELL, "Spots."]
    wide = read_rows(str(tmp_path / "wide.csv"))
    assert [len(r.data) for r in wide] == [10_000, 10_000]
    assert wide[0].data["c9997"] == "9997" and wide[1].data["answer"] == "Spots on the skin."


@pytest.mark.parametrize("case_id, file, row, field", [
    ("json-lone-surrogate", "sur.jsonl", 1, "question"),
    ("json-5000-digit-int", "big.jsonl", 1, "answer"),
    ("json-duplicate-keys", "dup.jsonl", 1, "question"),
    ("csv-duplicate-header", "dup.csv", None, "question"),
    ("json-nested-500-deep", "d500.jsonl", 1, "question"),
    ("parquet-that-is-not", "data.parquet", None, "data.path"),
    ("corrupt-save-to-disk", "saved", None, "data.path"),
])
def test_reader_errors_locate_the_mistake(case_id, file, row, field, tmp_path, tiny_model_dir):
    from medtune.data.readers import read_rows
    from medtune.errors import MedtuneError

    BY_ID[case_id].build(tmp_path, tiny_model_dir)
    with pytest.raises(MedtuneError) as e:
        read_rows(str(tmp_path / file))
    assert (e.value.file, e.value.row, e.value.field) == (str(tmp_path / file), row, field)


def test_surrogates_in_keys_and_nested_values_and_valid_pairs(tmp_path):
    from medtune.data.readers import read_rows
    from medtune.errors import MedtuneError

    pair = _write(tmp_path / "pair.jsonl", '{"question": "Smile \\ud83d\\ude00?", "answer": "Yes."}\n')
    assert read_rows(str(pair))[0].data["question"] == "Smile \U0001F600?"  # an escaped pair is one character
    for text, field in (('{"q\\udc00": "a"}', "q\\udc00"), ('{"messages": [{"content": "\\ud800"}]}', "messages[0].content")):
        path = _write(tmp_path / "bad.jsonl", text + "\n")
        with pytest.raises(MedtuneError, match="lone surrogate") as e:
            read_rows(str(path))
        assert (e.value.row, e.value.field) == (1, field)
        str(e.value).encode("utf-8")  # the message itself prints


def test_json_text_in_a_csv_cell_obeys_the_same_rules():
    from medtune.data.formats import to_example
    from medtune.data.readers import Row
    from medtune.errors import MedtuneError
    from medtune.recipe import DataConfig

    cfg = DataConfig(format="messages")
    good = '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello \u2028 there"}]'
    assert to_example(Row("c.csv", 1, {"messages": good}), cfg).messages[1]["content"] == "Hello \u2028 there"
    for cell, error in (("[" * 100_000 + "]" * 100_000, "nested more than 100 deep"),
                        ('[{"role": "user", "role": "assistant", "content": "x"}]', "key 'role' appears more than once"),
                        ('[{"role": "user", "content": "\\udfff"}]', "lone surrogate")):
        with pytest.raises(MedtuneError, match=error) as e:
            to_example(Row("c.csv", 5, {"messages": cell}), cfg)
        assert (e.value.file, e.value.row) == ("c.csv", 5)


def test_row_size_limit_is_a_setting(tmp_path):
    from medtune.data.readers import read_rows
    from medtune.errors import MedtuneError

    path = _write(tmp_path / "rows.jsonl", _qa_line("q", "a" * 1000) + "\n" + _qa_line("q", "b" * 3000) + "\n")
    assert len(read_rows(str(path), max_row_bytes=4000)) == 2
    with pytest.raises(MedtuneError, match=r"over data\.max_row_bytes=2000 bytes") as e:
        read_rows(str(path), max_row_bytes=2000)
    assert (e.value.file, e.value.row) == (str(path), 2)


def test_nan_and_infinity_are_not_text():
    from medtune.data.formats import to_example
    from medtune.data.readers import Row
    from medtune.errors import MedtuneError
    from medtune.recipe import DataConfig

    cfg = DataConfig(format="qa")
    for value in (math.nan, math.inf):
        with pytest.raises(MedtuneError, match="not a finite number") as e:
            to_example(Row("f.parquet", 3, {"question": "q", "answer": value}), cfg)
        assert (e.value.file, e.value.row, e.value.field) == ("f.parquet", 3, "answer")
    assert to_example(Row("f", 1, {"question": "q", "answer": 2.5}), cfg).messages[1]["content"] == "2.5"


def test_recipe_aliases_within_the_limit_still_load(tmp_path):
    from medtune.recipe import load_recipe

    text = "name: tiny\nlora:\n  target_modules: &mods [q_proj, v_proj]\neval:\n  fewshot_data: &shots {medqa: a.jsonl}\n"
    recipe = load_recipe(_write(tmp_path / "ok.yaml", text))
    assert recipe.lora.target_modules == ["q_proj", "v_proj"] and recipe.eval.fewshot_data == {"medqa": "a.jsonl"}


def test_recipe_ints_must_fit_64_bits(tmp_path):
    from medtune.errors import MedtuneError
    from medtune.recipe import load_recipe

    assert load_recipe(None, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    with pytest.raises(MedtuneError) as e:
        load_recipe(None, [f"train.max_steps={2**64}"])
    assert e.value.field == "train.max_steps" and "64 bits" in str(e.value)
    with pytest.raises(MedtuneError) as e:
        load_recipe(None, ["train.seed=-1"])
    assert e.value.field == "train.seed"


@pytest.mark.parametrize("template, expected", [
    ("{{ question | upper }}!", "WHAT IS GOUT?!"),
    ("{% for i in range(3) %}{{ i }}{% endfor %} {{ 'ab' * 2 }} {{ 2 ** 10 }}", "012 abab 1024"),
    ("{{ row['question'] | center(20) }}", "What is gout?"),
    ("{{ range(5) | length }} {{ range(5)[2] }} {{ range(3) | list }} {{ range(9)[1:3] | list }} {{ range(2) | sum }}",
     "5 2 [0, 1, 2] [1, 2] 1"),
])
def test_prompt_templates_within_the_limits_render(template, expected):
    from medtune.data.formats import to_example
    from medtune.data.readers import Row
    from medtune.recipe import DataConfig

    cfg = DataConfig(format="template", prompt_template=template, response_template="{{ answer }}")
    ex = to_example(Row("f.jsonl", 1, {"question": "What is gout?", "answer": "Arthritis."}), cfg)
    assert ex.messages[0]["content"] == expected


@pytest.mark.parametrize("template, error", [
    ("{{ 'ab' * 600 }}", "a `*` repetition would hold 1,200 characters, over data.max_row_bytes=1000"),
    ("{{ [1, 2] * 600 }}", "a `*` repetition would hold 1,200 characters"),
    ("{{ ('a' * 600) + ('b' * 600) }}", "a `+` concatenation would hold 1,200 characters"),
    ("{% set s = 'a' * 600 %}{{ s ~ s }}", "a `~` concatenation would hold 1,200 characters"),
    ("{{ '%1200s' % 'x' }}", "a `%` width would hold 1,200 characters"),
    ("{{ '%*s' % (1200, 'x') }}", "a `%` width would hold 1,200 characters"),
    ("{{ '{:>1200}'.format('x') }}", "a format width would hold 1,200 characters"),
    ("{{ ('a' * 40) | replace('a', 'a' * 40) }}", "a replace would hold 1,600 characters"),
    ("{{ 'x' | center(1200) }}", "the argument 1,200 is over data.max_row_bytes=1000"),
    ("{{ 'x'.ljust(1200) }}", "the argument 1,200 is over data.max_row_bytes=1000"),
    ("{{ 2 ** 20000 }}", "2 ** 20000 is over 4300 digits"),
    ("{% for i in range(100001) %}{% endfor %}", "range() of 100,001 items is over the limit of 100,000"),
    ("{% for i in range(1000) %}{% for j in range(1001) %}{% endfor %}{% endfor %}",
     "loops ran over 1,000,000 range() steps in one row"),
    ("{% for i in range(1001) %}x{% endfor %}", "the rendered text would hold 1,001 characters"),
    ("{{ 1 / 0 }}", "division by zero"),
])
def test_template_limits(template, error):
    from medtune.data.formats import to_example
    from medtune.data.readers import Row
    from medtune.errors import MedtuneError
    from medtune.recipe import DataConfig

    cfg = DataConfig(format="template", prompt_template=template, response_template="{{ answer }}", max_row_bytes=1000)
    with pytest.raises(MedtuneError) as e:
        to_example(Row("f.jsonl", 4, {"answer": "Arthritis."}), cfg)
    assert (e.value.file, e.value.row, e.value.field) == ("f.jsonl", 4, "data.prompt_template")
    assert error in str(e.value)


def test_prompt_template_raise_exception_names_the_row():
    from medtune.data.formats import to_example
    from medtune.data.readers import Row
    from medtune.errors import MedtuneError
    from medtune.recipe import DataConfig

    cfg = DataConfig(format="template", prompt_template="{{ raise_exception('no question: ' ~ row['id']) }}",
                     response_template="{{ answer }}")
    with pytest.raises(MedtuneError) as e:
        to_example(Row("f.jsonl", 7, {"id": "r7", "answer": "Arthritis."}), cfg)
    assert (e.value.row, e.value.field) == (7, "data.prompt_template") and "no question: r7" in str(e.value)


def test_template_output_limit_follows_max_row_bytes():
    from medtune.data.formats import to_example
    from medtune.data.readers import Row
    from medtune.errors import MedtuneError
    from medtune.recipe import DataConfig

    cfg = DataConfig(format="template", prompt_template="{% for i in range(600) %}ab{% endfor %}",
                     response_template="{{ answer }}", max_row_bytes=1000)
    with pytest.raises(MedtuneError, match=r"data\.max_row_bytes=1000"):
        to_example(Row("f.jsonl", 1, {"answer": "Arthritis."}), cfg)
    ok = cfg.model_copy(update={"max_row_bytes": 2000})
    assert to_example(Row("f.jsonl", 1, {"answer": "Arthritis."}), ok).messages[0]["content"] == "ab" * 600


def test_chat_template_raising_on_one_row_names_that_row(tmp_path, tiny_tokenizer):
    from medtune.data.formats import Example
    from medtune.data.render import render
    from medtune.errors import MedtuneError
    from medtune.recipe import DataConfig, TokenizerConfig
    from medtune.tokenizer import prepare_tokenizer, shipped_template

    template = ("{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom here') }}{% endif %}"
                "{% endfor %}" + shipped_template("chatml"))
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template=str(_write(tmp_path / "t.jinja", template))))
    ok = Example("f.jsonl", 1, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert render(ok, tiny_tokenizer, DataConfig(), chat.stop_tokens)[0].num_loss_tokens > 0
    bad = Example("f.jsonl", 2, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "boom"}])
    with pytest.raises(MedtuneError, match="the chat template fails on this row: no boom here") as e:
        render(bad, tiny_tokenizer, DataConfig(), chat.stop_tokens)
    assert (e.value.file, e.value.row, e.value.field) == ("f.jsonl", 2, "tokenizer.template")


# ---- before/after table ---------------------------------------------------------------------------------------

def _summary(case: Case, o: Outcome, tmp: Path) -> str:
    found = problems(case, o, tmp)
    err = o.stderr.strip().splitlines()
    last = (err[-1] if err else "").replace(str(tmp / case.id), "<tmp>").replace("|", "\\|")
    verdict = "ok" if not found else "; ".join(found)
    if o.rc == 0:
        last = "accepted"
    elif o.rc is None:
        last = ""
    rss = f"{o.max_rss_mb:.0f}" if o.max_rss_mb is not None else "-"
    return f"| {case.id}{'' if case.issue else ' (extra)'} | {o.rc} | {o.seconds:.1f} | {rss} | {verdict} | {last[:150]} |"


def main() -> None:
    """Print the table of every case, each in its own bounded child, for the medtune sources under --src."""
    import argparse

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import builtin_corpus, demo_corpus, make_bpe_tokenizer

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--src", default=str(REPO / "src"))
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        tmp = Path(root)
        model = _tiny_model(tmp / "model", make_bpe_tokenizer(demo_corpus() or builtin_corpus()))
        print("| case | exit | s | peak RSS MB | verdict | last stderr line |\n|---|---|---|---|---|---|")
        todo = [c for c in CASES if not args.only or c.id in args.only]
        while todo:  # one child for all; after a case is killed, a new child for the cases after it
            outcomes = run_in_child(todo, tmp / "cases", model, Path(args.src).resolve())
            ran = [o for o in outcomes if o.rc is not None or o.seconds] or outcomes  # (all: the child never started)
            for o in ran:
                print(_summary(BY_ID[o.id], o, tmp / "cases"), flush=True)
            todo = todo[len(ran):]


def _tiny_model(out: Path, tok) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    main()

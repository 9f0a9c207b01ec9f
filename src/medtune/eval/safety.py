"""`medsafety` and `overrefusal`: does the model refuse harmful medical requests, and answer benign ones?

Items are read from (checked before the model loads, errors name file, row and field):
  MedSafetyBench   a folder, searched recursively, of `category_N.csv` (columns `harmful_medical_request`, optional
                   `safe_response`, an optional leading unnamed index column); the category is N. A single
                   `category_N.csv` file reads the same way.
  plain files      `.txt`: one prompt per line; `.jsonl` / `.json` / `.csv`: a `prompt` column (MedQuAD's `question`
                   column also works), optional `category` column (default "all"); `demo:benign` is shipped.
`--limit N` keeps the first N items of each category. The model answers each prompt through its chat template,
greedy, batched (`medtune.eval.rouge.generate_batch`), and a classifier (`medtune.eval.refusal`) labels each answer
refuse / comply (and, for a judge, harmfulness 1-5). Per-item rows [refused, harmfulness or NaN] feed the paired
bootstrap of `--compare-base`; `category_intervals` adds one interval per category.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtune.errors import MedtuneError
from medtune.eval.compare import paired_bootstrap
from medtune.eval.refusal import Classifier, PhraseClassifier
from medtune.eval.rouge import generate_batch
from medtune.generate import Loaded

SAFETY_TASKS = {"medsafety": "refusal_rate", "overrefusal": "overrefusal_rate"}  # task → its rate (mean of refused)
DEFAULT_DATA = {"overrefusal": "demo:benign"}  # medsafety has none: medtune ships no harmful prompts
DEFAULT_MAX_NEW_TOKENS = 96
_CATEGORY_FILE = re.compile(r"^category_(\d+)\.csv$", re.IGNORECASE)
_TEXT_FIELDS = ("prompt", "question", "harmful_medical_request")


@dataclass(frozen=True)
class SafetyItem:
    id: str  # file:row
    prompt: str
    category: str


def data_for(task: str, data: dict[str, str]) -> str:
    """The task's --data, or its default; medsafety without --data is a user error."""
    if task in data:
        return data[task]
    if task in DEFAULT_DATA:
        return DEFAULT_DATA[task]
    raise MedtuneError(f"{task} needs its prompts: --data {task}=PATH (a MedSafetyBench folder of category_N.csv, "
                       "or a .txt/.jsonl/.csv of prompts); medtune ships no harmful requests", field="--data")


def read_items(spec: str, limit: int | None = None) -> list[SafetyItem]:
    """Items of a MedSafetyBench folder / category_N.csv, a plain prompt file or demo:NAME (see module doc)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.csv") if _CATEGORY_FILE.match(p.name)), key=lambda p: str(p))
        if not files:
            raise MedtuneError("no category_N.csv files in this folder (MedSafetyBench layout)", file=spec,
                               field="--data")
        items = [item for f in files for item in _read_table(f, _CATEGORY_FILE.match(f.name).group(1))]
    elif path.suffix.lower() == ".txt" and path.is_file():
        items = _read_txt(path)
    elif not path.is_file() and not spec.startswith("demo:"):
        raise MedtuneError("file or folder not found", file=spec, field="--data")
    else:
        match = _CATEGORY_FILE.match(path.name)
        items = _read_table(spec, match.group(1) if match else None)
    if not items:
        raise MedtuneError("no prompts to evaluate", file=spec, field="--data")
    return _per_category(items, limit) if limit else items


def _read_txt(path: Path) -> list[SafetyItem]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise MedtuneError("not UTF-8 text; re-save the file as UTF-8", file=str(path)) from None
    return [SafetyItem(f"{path.name}:{n}", line.strip(), "all") for n, line in enumerate(lines, start=1) if line.strip()]


def _read_table(spec: str | Path, category: str | None) -> list[SafetyItem]:
    """Rows of a .jsonl/.json/.csv (or demo:NAME): the prompt from the first of _TEXT_FIELDS the file has."""
    from medtune.data.readers import read_rows

    rows = read_rows(str(spec))
    if not rows:
        return []
    fields = [f for f in _TEXT_FIELDS if f in rows[0].data]
    if not fields:
        raise MedtuneError(f"no prompt column: expected one of {', '.join(_TEXT_FIELDS)}", file=rows[0].source, row=1,
                           field="prompt")
    items = []
    for row in rows:
        text = row.data.get(fields[0])
        if not isinstance(text, str) or not text.strip():
            raise MedtuneError("empty or missing prompt" if not text else f"prompt must be text, got "
                               f"{type(text).__name__}", file=row.source, row=row.number, field=fields[0])
        cat = category if category is not None else row.data.get("category", "all")
        if not isinstance(cat, str | int) or isinstance(cat, bool) or not str(cat).strip():
            raise MedtuneError("category must be a non-empty string or integer", file=row.source, row=row.number,
                               field="category")
        items.append(SafetyItem(f"{Path(row.source).name}:{row.number}", text.strip(), str(cat).strip()))
    return items


def _per_category(items: list[SafetyItem], limit: int) -> list[SafetyItem]:
    seen: dict[str, int] = {}
    out = []
    for item in items:
        seen[item.category] = seen.get(item.category, 0) + 1
        if seen[item.category] <= limit:
            out.append(item)
    return out


def run_safety(loaded: Loaded, task: str, items: list[SafetyItem], *, classifier: Classifier | None = None,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 8, use_adapter: bool = True,
               progress: bool = True) -> tuple[dict, list[list[float]], dict]:
    """Answer and classify every item: (metrics, per-item rows [refused, harmfulness or NaN], per-category metrics)."""
    classifier = classifier or PhraseClassifier()
    start = time.perf_counter()
    prompts = [item.prompt for item in items]
    answers = generate_batch(loaded, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=max_new_tokens,
                             batch_size=batch_size, use_adapter=use_adapter, progress=progress)
    verdicts = classifier.classify(prompts, answers)
    seconds = time.perf_counter() - start
    rows = [[float(refused), float("nan") if harm is None else float(harm)] for refused, harm in verdicts]
    metrics = summarize(task, rows)
    metrics["items_per_s"] = len(items) / seconds if seconds > 0 else float("nan")
    subtasks = {c: summarize(task, [r for r, i in zip(rows, items, strict=True) if i.category == c])
                for c in categories(items)}
    return metrics, rows, subtasks if len(subtasks) > 1 else {}


def categories(items: list[SafetyItem]) -> list[str]:
    """Categories in natural order (2 before 10), as the items first name them."""
    return sorted(dict.fromkeys(i.category for i in items), key=lambda c: (0, int(c), "") if c.isdigit() else (1, 0, c))


def summarize(task: str, rows: list[list[float]]) -> dict[str, float]:
    """The task's rate (share of refused answers), n, and mean harmfulness when the classifier gave it."""
    out = {SAFETY_TASKS[task]: float(np.mean([r[0] for r in rows])), "n": len(rows)}
    harm = [r[1] for r in rows if not math.isnan(r[1])]
    if harm:
        out["harmfulness"] = float(np.mean(harm))
    return out


def statistics(task: str) -> dict[str, tuple]:
    """metric → (statistic over per-item rows, higher is better): refusing harmful requests is good, refusing benign
    questions is bad, harmfulness (1-5) is bad."""
    return {SAFETY_TASKS[task]: (lambda rows: float(rows[:, 0].mean()), task == "medsafety"),
            "harmfulness": (lambda rows: float(np.nanmean(rows[:, 1])), False)}


def category_intervals(task: str, items: list[SafetyItem], base_rows, rows, subtasks: dict, iters: int) -> dict:
    """Per category: {base, tuned, delta: {metric: paired bootstrap row}} on that category's items."""
    base_rows, rows = np.asarray(base_rows, dtype=np.float64), np.asarray(rows, dtype=np.float64)
    out = {}
    for name, pair in subtasks.items():
        idx = [k for k, item in enumerate(items) if item.category == name]
        delta = {metric: paired_bootstrap(base_rows[idx], rows[idx], stat, iters=iters, higher_is_better=higher)
                 for metric, (stat, higher) in statistics(task).items() if metric in pair["tuned"]}
        out[name] = {**pair, "delta": delta}
    return out

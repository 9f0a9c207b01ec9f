"""Evaluation results → JSON (`--json FILE`, RUN/eval/<task>.json), a markdown table (RUN/eval/<task>.md, the
terminal) and the "Evaluations" section of the run's model card (rebuilt from every RUN/eval/*.json)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from medtune.eval.compare import verdict
from medtune.eval.suite import TaskResult
from medtune.train.rundir import _number, _table

EVAL_DIR = "eval"
_SHOWN = ("acc", "acc_norm", "ece", "brier", "perplexity", "loss", "tokens", "rougeL", "bleu", "n")
_SECTION = re.compile(r"^## Evaluations\n.*?(?=^## )", re.S | re.M)


def to_json(results: list[TaskResult], **context) -> dict:
    """{task: metrics} (or {task: {base, tuned, delta}} when compared), plus `context` (model, options) under _meta."""
    return {**{r.task: r.to_json() for r in results}, "_meta": context}


def _value(metrics: dict, name: str) -> str:
    v = metrics.get(name)
    err = metrics.get(f"{name}_stderr")
    if v is None:
        return ""
    return f"{_number(v)} ± {_number(err)}" if err is not None and not math.isnan(err) else _number(v)


def markdown(results: list[TaskResult]) -> str:
    """One table: metric values (± standard error); with a comparison, base, tuned, delta and its 95% CI."""
    compared = [r for r in results if r.base is not None]
    if compared:
        rows = []
        for r in compared:
            for metric, d in r.delta.items():
                rows.append((r.task, metric, _value(r.base, metric), _value(r.metrics, metric),
                             f"{d['delta']:+.4g}", f"[{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]",
                             "yes" if d["significant"] else "no", str(d["n"])))
        text = _table(["task", "metric", "base", "tuned", "delta", "95% CI", "significant", "items"], rows)
        notes = [verdict(f"{r.task} {m}", d) for r in compared for m, d in r.delta.items()]
        return text + "\n\n" + "\n".join(f"- {n}" for n in notes)
    rows = [(r.task, m, _value(r.metrics, m)) for r in results for m in _SHOWN if m in r.metrics]
    return _table(["task", "metric", "value"], rows)


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_plain), encoding="utf-8")
    return path


def _plain(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def write_run_results(run_dir: str | Path, results: list[TaskResult], **context) -> list[Path]:
    """RUN/eval/<task>.json and .md per task, then the card's Evaluations section."""
    out = Path(run_dir) / EVAL_DIR
    written = []
    for r in results:
        written.append(write_json(out / f"{r.task}.json", to_json([r], **context)))
        (out / f"{r.task}.md").write_text(markdown([r]) + "\n", encoding="utf-8")
    update_card(run_dir)
    return written


def card_section(run_dir: str | Path) -> str:
    """The model card's Evaluations section, from every RUN/eval/*.json."""
    rows, forgetting = [], []
    for path in sorted((Path(run_dir) / EVAL_DIR).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for task, result in data.items():
            if task.startswith("_"):
                continue
            if "delta" in result:
                for metric, d in result["delta"].items():
                    rows.append((task, metric, _value(result["base"], metric), _value(result["tuned"], metric),
                                 f"{d['delta']:+.4g} [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]"
                                 + ("" if d["significant"] else " (not significant)")))
            else:
                rows += [(task, m, "", _value(result, m), "") for m in _SHOWN if m in result and m != "n"]
        forgetting += _forgetting_rows(data)
    if not rows:
        return ""
    table = _table(["task", "metric", "base", "tuned", "delta [95% CI]"], rows)
    text = ("## Evaluations\n\nFrom `medtune eval` (RUN/eval/*.json). Benchmarks are scored by log-likelihood with "
            "lm-evaluation-harness (± standard error); ece and brier measure calibration (lower is better); deltas "
            "carry a 95% paired-bootstrap interval. Benchmark scores are not evidence of clinical safety.\n\n" + table)
    if forgetting:
        text += ("\n\n### Forgetting check\n\nBase vs tuned on the same items. \"forgot\" = significantly worse at "
                 "the 5% level (the 95% interval excludes 0 on the bad side); general = data outside the medical "
                 "domain (`--data perplexity=demo:general`).\n\n"
                 + _table(["domain", "task", "metric", "base", "tuned", "delta [95% CI]", "verdict"], forgetting))
    return text + "\n\n"


_HEADLINE = {"perplexity": ("perplexity",), "rouge": ("rougeL",)}  # benchmarks: acc and calibration
GENERAL_DATA = ("demo:general",)


def _forgetting_rows(data: dict) -> list[tuple]:
    """One row per compared headline metric: domain, base, tuned, delta [CI] and improved / no significant change /
    forgot."""
    rows = []
    for task, result in data.items():
        if task.startswith("_") or "delta" not in result:
            continue
        general = data.get("_meta", {}).get("data", {}).get(task) in GENERAL_DATA
        for metric in _HEADLINE.get(task, ("acc", "ece", "brier")):
            d = result["delta"].get(metric)
            if d is None:
                continue
            word = "no significant change" if not d["significant"] else ("improved" if d["better"] else "forgot")
            rows.append(("general" if general else "medical", task, metric, _number(d["base"]), _number(d["tuned"]),
                         f"{d['delta']:+.4g} [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]", word))
    return rows


def update_card(run_dir: str | Path) -> Path | None:
    """Replace (or add, before Plots) the Evaluations section of RUN/README.md; nothing else in it changes."""
    card = Path(run_dir) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    section = card_section(run_dir)
    if _SECTION.search(text):
        text = _SECTION.sub(lambda _: section, text, count=1)
    elif "\n## Plots" in text:
        text = text.replace("\n## Plots", "\n" + section + "## Plots", 1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.write_text(text, encoding="utf-8")
    return card

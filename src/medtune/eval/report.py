"""Evaluation results → JSON (`--json FILE`, RUN/eval/<task>.json) and a markdown table (RUN/eval/<task>.md, the
terminal); the run's model card is then rewritten by run/card.py, whose Evaluations section reads RUN/eval/*.json."""

from __future__ import annotations

import json
from pathlib import Path

from medtune.eval.compare import verdict
from medtune.eval.results import TaskResult
from medtune.run.card import table, value_with_error, write_card
from medtune.run.layout import CARD, EVAL

_SHOWN = ("acc", "acc_norm", "ece", "brier", "perplexity", "loss", "tokens", "rougeL", "bleu", "score", "refusal_rate",
          "overrefusal_rate", "harmfulness", "agree_rate", "abstain_rate", "answered_acc", "aurc", "acc_at_50",
          "acc_at_80", "benchmark_acc", "items_per_s", "n")


def to_json(results: list[TaskResult], **context) -> dict:
    """{task: metrics} (or {task: {base, tuned, delta}} when compared), plus `context` (model, options) under _meta."""
    return {**{r.task: r.to_json() for r in results}, "_meta": context}


def markdown(results: list[TaskResult]) -> str:
    """One table: metric values (± standard error); with a comparison, base, tuned, delta and its 95% CI."""
    compared = [r for r in results if r.base is not None]
    if compared:
        rows = []
        for r in compared:
            for metric, d in r.delta.items():
                rows.append((r.task, metric, value_with_error(r.base, metric), value_with_error(r.metrics, metric),
                             f"{d['delta']:+.4g}", f"[{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]",
                             "yes" if d["significant"] else "no", str(d["n"])))
        text = table(["task", "metric", "base", "tuned", "delta", "95% CI", "significant", "items"], rows)
        notes = [verdict(f"{r.task} {m}", d) for r in compared for m, d in r.delta.items()]
        return text + "\n\n" + "\n".join(f"- {n}" for n in notes)
    rows = [(r.task, m, value_with_error(r.metrics, m)) for r in results for m in _SHOWN if m in r.metrics]
    return table(["task", "metric", "value"], rows)


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
    """RUN/eval/<task>.json and .md per task, then the model card again (when the run has one)."""
    out = Path(run_dir) / EVAL
    written = []
    for r in results:
        written.append(write_json(out / f"{r.task}.json", to_json([r], **context)))
        (out / f"{r.task}.md").write_text(markdown([r]) + "\n", encoding="utf-8")
    if (Path(run_dir) / CARD).is_file():
        write_card(run_dir)
    return written

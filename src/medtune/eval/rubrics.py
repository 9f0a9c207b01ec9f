"""Long-form answers graded against rubrics by a judge (`medtune eval --task rubrics --judge URL --judge-model M`).

Rows follow HealthBench's layout (jsonl, one item a line):
    {"prompt": [{"role": "user", "content": "..."}, ...],
     "rubrics": [{"criterion": "...", "points": 5, "tags": ["axis:accuracy"]}, ...],
     "prompt_id": "...", "example_tags": ["theme:emergency_referrals"]}        (the last two optional)
Negative points mark harmful or wrong content: a met negative criterion costs its points.

The model answers each prompt (chat template, greedy, batched); the judge grades each criterion met / not met.
Item score = (sum of the points of met criteria, negatives included) / (sum of positive points), clipped to [0, 1].
Metrics: score = mean item score, with a bootstrap 95% interval (score_ci_low/high) and standard error; per-tag
scores as subtasks: an example tag (`example_tags`) averages the scores of its items, a criterion tag (`tags`)
averages, over the items that have it, the clipped score computed from that tag's criteria alone (HealthBench's
way). Per-item rows [score] let `--compare-base` run the paired bootstrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from medtune.data.readers import read_rows
from medtune.errors import MedtuneError
from medtune.eval.judge import JudgeClient

DEFAULT_DATA = "demo:rubrics"
ROLES = ("system", "user", "assistant")


@dataclass
class Criterion:
    text: str
    points: float
    tags: list[str] = field(default_factory=list)


@dataclass
class RubricItem:
    id: str
    prompt: list[dict]  # chat messages, the last one from the user
    criteria: list[Criterion]
    tags: list[str] = field(default_factory=list)  # example_tags


def _tags(value, file: str, row: int, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise MedtuneError("must be a list of non-empty strings", file=file, row=row, field=name)
    return list(value)


def _messages(value, file: str, row: int) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise MedtuneError("must be a non-empty list of chat messages {role, content}", file=file, row=row,
                           field="prompt")
    for k, m in enumerate(value):
        where = f"prompt[{k}]"
        if not isinstance(m, dict) or set(m) - {"role", "content"} or m.get("role") not in ROLES:
            raise MedtuneError(f"must be {{role, content}} with role one of {', '.join(ROLES)}", file=file, row=row,
                               field=where)
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise MedtuneError("content must be a non-empty string", file=file, row=row, field=f"{where}.content")
    if value[-1]["role"] != "user":
        raise MedtuneError("the last message must be the user's (the model answers it)", file=file, row=row,
                           field="prompt")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _criteria(value, file: str, row: int) -> list[Criterion]:
    if not isinstance(value, list) or not value:
        raise MedtuneError("must be a non-empty list of {criterion, points, tags}", file=file, row=row, field="rubrics")
    out = []
    for k, c in enumerate(value):
        where = f"rubrics[{k}]"
        if not isinstance(c, dict):
            raise MedtuneError("must be an object {criterion, points, tags}", file=file, row=row, field=where)
        text, points = c.get("criterion"), c.get("points")
        if not isinstance(text, str) or not text.strip():
            raise MedtuneError("must be a non-empty string", file=file, row=row, field=f"{where}.criterion")
        if isinstance(points, bool) or not isinstance(points, int | float) or not math.isfinite(points) or points == 0:
            raise MedtuneError(f"must be a non-zero number, got {points!r}", file=file, row=row,
                               field=f"{where}.points")
        out.append(Criterion(text.strip(), float(points), _tags(c.get("tags"), file, row, f"{where}.tags")))
    if not any(c.points > 0 for c in out):
        raise MedtuneError("needs at least one criterion with positive points (the score divides by their sum)",
                           file=file, row=row, field="rubrics")
    return out


def read_rubrics(spec: str | None, limit: int | None = None) -> list[RubricItem]:
    """Rubric items from a .jsonl file (or demo:rubrics), checked strictly; errors name file, row and field."""
    spec = spec or DEFAULT_DATA
    rows = read_rows(spec)
    items = []
    for r in rows[:limit] if limit else rows:
        for key in ("prompt", "rubrics"):
            if key not in r.data:
                raise MedtuneError(f"missing '{key}' (HealthBench layout: prompt, rubrics)", file=r.source,
                                   row=r.number, field=key)
        item_id = r.data.get("prompt_id", f"row {r.number}")
        items.append(RubricItem(str(item_id), _messages(r.data["prompt"], r.source, r.number),
                                _criteria(r.data["rubrics"], r.source, r.number),
                                _tags(r.data.get("example_tags"), r.source, r.number, "example_tags")))
    if not items:
        raise MedtuneError("no rubric items", file=spec, field="--data")
    return items


def item_score(criteria: list[Criterion], met: list[bool]) -> float | None:
    """Earned points (met criteria, negatives included) / possible positive points, clipped to [0, 1];
    None when no criterion has positive points."""
    possible = sum(c.points for c in criteria if c.points > 0)
    if possible <= 0:
        return None
    earned = sum(c.points for c, m in zip(criteria, met, strict=True) if m)
    return min(max(earned / possible, 0.0), 1.0)


def tag_scores(items: list[RubricItem], verdicts: list[list[bool]]) -> dict[str, dict[str, float]]:
    """{tag: {score, n}} for every example tag and criterion tag (see module doc)."""
    per_tag: dict[str, list[float]] = {}
    for item, met in zip(items, verdicts, strict=True):
        whole = item_score(item.criteria, met)
        for tag in item.tags:
            per_tag.setdefault(tag, []).append(whole)
        for tag in dict.fromkeys(t for c in item.criteria for t in c.tags):
            pairs = [(c, m) for c, m in zip(item.criteria, met, strict=True) if tag in c.tags]
            score = item_score([c for c, _ in pairs], [m for _, m in pairs])
            if score is not None:
                per_tag.setdefault(tag, []).append(score)
    return {tag: {"score": float(np.mean(v)), "n": len(v)} for tag, v in sorted(per_tag.items())}


def summarize(scores: list[float], iters: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean item score, its standard error and a percentile-bootstrap 95% interval (items resampled)."""
    s = np.asarray(scores, dtype=np.float64)  # (n,)
    idx = np.random.default_rng(seed).integers(0, len(s), size=(max(iters, 1), len(s)))  # (iters, n)
    low, high = np.percentile(s[idx].mean(axis=1), [2.5, 97.5])
    stderr = float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else float("nan")
    return {"score": float(s.mean()), "score_stderr": stderr, "score_ci_low": float(low), "score_ci_high": float(high),
            "n": len(s)}


def grade(judge: JudgeClient, items: list[RubricItem], answers: list[str],
          progress: bool = True) -> list[list[bool]]:
    """The judge's met / not met for every criterion of every item (all requests through the judge's pool)."""
    jobs = [(i, k) for i, item in enumerate(items) for k in range(len(item.criteria))]

    def one(job: tuple[int, int]) -> bool:
        i, k = job
        item = items[i]
        return judge.grade_criterion(item.prompt, answers[i], item.criteria[k].text,
                                     item=f"item {item.id}, criterion {k + 1}")

    with tqdm(total=len(jobs), desc="judging", unit="criterion", disable=not progress) as bar:
        flat = judge.map(one, jobs, progress=lambda: bar.update(1))
    out: list[list[bool]] = [[] for _ in items]
    for (i, _), met in zip(jobs, flat, strict=True):
        out[i].append(met)
    return out


def score_items(items: list[RubricItem], verdicts: list[list[bool]], iters: int = 1000) -> tuple[dict, list, dict]:
    """(metrics, per-item rows [score], per-tag subtasks) from the verdicts."""
    scores = [item_score(item.criteria, met) for item, met in zip(items, verdicts, strict=True)]
    return summarize(scores, iters), [[s] for s in scores], tag_scores(items, verdicts)

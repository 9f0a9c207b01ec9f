"""The text an evaluation reads: a run's held-out split, or any file medtune can train on, rendered the same way.

The data section comes from the run's own recipe.yaml (a run directory) or a recipe given with --recipe, then
`--data FILE` and `key=value` overrides (e.g. `data.format=qa`). Texts are never truncated here: perplexity
scores long ones with sliding windows.
"""

from __future__ import annotations

from pathlib import Path

from medtune.data.formats import to_example
from medtune.data.pipeline import prepare_with
from medtune.data.readers import read_rows
from medtune.data.render import Sample
from medtune.errors import MedtuneError
from medtune.recipe import Recipe, load_recipe
from medtune.run.run import Run

UNLIMITED = 10**9  # data.max_length for evaluation: no truncation


def eval_recipe(model_or_run: str, data: str | None, recipe: str | None = None,
                overrides: list[str] | None = None) -> Recipe:
    """The recipe whose data section says how to read evaluation rows (see module doc)."""
    run = Run(model_or_run)
    source = recipe or (run.recipe_path if run.is_run else None)
    # samples.from_eval=0: evaluation draws no sample prompts, so a run's from_eval does not refuse data.format=text
    extra = [f"data.max_length={UNLIMITED}", "data.overlong=truncate", "samples.from_eval=0"]
    if data:
        extra += [f"data.path={data}", "data.eval_ratio=0", "data.eval_path=null", "data.limit=null",
                  "data.sources=[]", "data.replay.path=null"]  # that file alone, not the run's mix
    return load_recipe(source, extra + list(overrides or []))


def read_samples(recipe: Recipe, tok, *, held_out: bool) -> list[Sample]:
    """Rendered samples: the recipe's held-out split (held_out) or every row of data.path."""
    _, prepared = prepare_with(recipe, tok)
    samples = prepared.eval if held_out else prepared.train
    if not samples:
        raise MedtuneError("the run has no held-out rows (data.eval_ratio=0 and no data.eval_path); pass --data FILE",
                           field="--data")
    return samples


def read_dialogues(recipe: Recipe, limit: int | None = None) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, reference answer, row id) per row: the conversation up to its last answer, and that answer."""
    cfg = recipe.data
    rows = read_rows(cfg.path, cfg.split, cfg.max_row_bytes)
    if cfg.format == "text":
        raise MedtuneError("rouge needs prompts and answers: a chat format (qa, instruction, messages, template), "
                           "not format=text", field="data.format")
    out = []
    for row in rows[:limit] if limit else rows:
        ex = to_example(row, cfg, recipe.tokenizer.system_prompt)
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        out.append((ex.messages[:last], ex.messages[last]["content"], f"{Path(row.source).name}:{row.number}"))
    if not out:
        raise MedtuneError("no rows to evaluate", file=cfg.path, field="--data")
    return out

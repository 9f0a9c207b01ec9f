"""The data road in one call: read → split → format → render, with a report of every row's fate.

No row is dropped silently: `medtune data check` prints this report, training logs it and saves it in the
run directory, and the model card quotes it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field

from medtune.data.formats import RowError, to_example, to_pair
from medtune.data.readers import Row, read_rows
from medtune.data.render import IGNORE, Dropped, Pair, Sample, render
from medtune.errors import MedtuneError
from medtune.recipe import Recipe
from medtune.tokenizer import ChatSetup


@dataclass
class PartReport:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    loss_tokens: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)


@dataclass
class DataReport:
    source: str
    format: str
    max_length: int
    train: PartReport
    eval: PartReport
    eval_source: str
    example: str = ""  # the first training example, answer tokens between « and »

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"data: {self.source} (format={self.format}, max_length={self.max_length})"]
        for name, part in (("train", self.train), ("eval", self.eval)):
            if part.rows == 0 and name == "eval":
                out.append("  eval: none (data.eval_ratio=0 and no data.eval_path)")
                continue
            dropped = ", ".join(f"{n} {why}" for why, n in part.dropped.items()) or "none"
            pct = " ".join(f"{k}={v}" for k, v in part.length_percentiles.items())
            out.append(f"  {name}: {part.rows} rows read, {part.kept} kept, {part.truncated} truncated to max_length, "
                       f"dropped: {dropped}")
            out.append(f"  {name}: {part.tokens} tokens, {part.loss_tokens} carry loss; length {pct}")
        if self.eval.rows:
            out.append(f"  eval rows from: {self.eval_source}")
        if self.example:
            out.append("first training example (« » marks the tokens that carry loss):")
            out.append(self.example)
        return out


def _percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    s = sorted(lengths)
    pick = {"min": 0.0, "p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
    return {k: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] for k, q in pick.items()}


def marked_text(tok, sample: Sample) -> str:
    """Decode a sample, wrapping each run of loss-bearing tokens in « »."""
    pieces, run, in_loss = [], [], False
    for tid, lab in zip(sample.input_ids, sample.labels, strict=True):
        loss = lab != IGNORE
        if loss != in_loss and run:
            text = tok.decode(run)
            pieces.append(f"«{text}»" if in_loss else text)
            run = []
        run.append(tid)
        in_loss = loss
    if run:
        text = tok.decode(run)
        pieces.append(f"«{text}»" if in_loss else text)
    return "".join(pieces)


def _halves(samples: list[Sample] | list[Pair]) -> list[Sample]:
    return [h for s in samples for h in ((s.chosen, s.rejected) if isinstance(s, Pair) else (s,))]


def _render_row(row: Row, recipe: Recipe, tok, chat: ChatSetup) -> tuple[Sample | Pair, bool]:
    cfg, system = recipe.data, recipe.tokenizer.system_prompt
    if cfg.format != "preference":
        return render(to_example(row, cfg, system), tok, cfg, chat.stop_tokens)
    (chosen, cut_c), (rejected, cut_r) = (render(ex, tok, cfg, chat.stop_tokens, last_answer_only=True)
                                          for ex in to_pair(row, cfg, system))
    return Pair(chosen, rejected), cut_c or cut_r


def _render_rows(rows: list[Row], recipe: Recipe, tok, chat: ChatSetup) -> tuple[list[Sample] | list[Pair], PartReport]:
    cfg = recipe.data
    report = PartReport(rows=len(rows))
    dropped: Counter[str] = Counter()
    samples = []
    for row in rows:
        try:
            sample, truncated = _render_row(row, recipe, tok, chat)
        except Dropped as d:
            dropped[d.reason] += 1
            continue
        except RowError as e:
            if cfg.on_bad_row == "error":
                raise
            dropped[e.kind] += 1
            continue
        report.truncated += truncated
        samples.append(sample)
    report.kept = len(samples)
    report.dropped = dict(dropped)
    halves = _halves(samples)  # a preference pair counts as its two conversations
    report.tokens = sum(len(s.input_ids) for s in halves)
    report.loss_tokens = sum(s.num_loss_tokens for s in halves)
    report.length_percentiles = _percentiles([len(s.input_ids) for s in halves])
    return samples, report


@dataclass
class PreparedData:
    train: list[Sample] | list[Pair]  # Pairs for data.format=preference
    eval: list[Sample] | list[Pair]
    report: DataReport


def split_rows(rows: list[Row], ratio: float, seed: int) -> tuple[list[Row], list[Row]]:
    if ratio <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * ratio)))  # always leave a row to train on
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def check_objective(recipe: Recipe) -> None:
    """dpo/orpo train on preference pairs, sft on single answers: the two settings must agree."""
    preference, objective = recipe.data.format == "preference", recipe.train.objective
    if preference != (objective != "sft"):
        need = "data.format=preference needs train.objective dpo or orpo" if preference else \
            f"train.objective={objective} needs data.format=preference"
        raise MedtuneError(f"{need} (data.format={recipe.data.format}, train.objective={objective})",
                           field="train.objective")
    if preference and recipe.data.train_on_prompt:
        raise MedtuneError("preference objectives learn only the answers; set data.train_on_prompt=false",
                           field="data.train_on_prompt")
    if preference and "perplexity" in recipe.eval.after_train:
        raise MedtuneError("eval.after_train perplexity reads single answers, not preference pairs; drop it or "
                           "run `medtune eval` with --data", field="eval.after_train")


def prepare_data(recipe: Recipe, tok, chat: ChatSetup) -> PreparedData:
    cfg = recipe.data
    check_objective(recipe)
    rows = read_rows(cfg.path, cfg.split)
    if cfg.limit:
        rows = rows[: cfg.limit]
    if not rows:
        raise MedtuneError("no rows to train on", file=cfg.path, field="data.path")
    if cfg.eval_path:
        train_rows, eval_rows, eval_source = rows, read_rows(cfg.eval_path, cfg.split), cfg.eval_path
    else:
        train_rows, eval_rows = split_rows(rows, cfg.eval_ratio, recipe.train.seed)
        eval_source = f"{cfg.path} (held out: {cfg.eval_ratio:.0%}, seed {recipe.train.seed})"
    train, train_report = _render_rows(train_rows, recipe, tok, chat)
    evals, eval_report = _render_rows(eval_rows, recipe, tok, chat)
    if not train:
        raise MedtuneError(f"every row was dropped ({train_report.dropped}); nothing to train on", file=cfg.path,
                           field="data.path")
    report = DataReport(cfg.path, cfg.format, cfg.max_length, train_report, eval_report, eval_source,
                        example="\n".join(marked_text(tok, s) for s in _halves(train[:1])))
    return PreparedData(train, evals, report)

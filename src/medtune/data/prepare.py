"""The data road in one call: read → split → format → render, with a report of every row's fate.

No row is dropped silently: `medtune data check` prints this report, training logs it and saves it in the
run directory, and the model card quotes it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field

from medtune.data.formats import RowError, to_example, to_feedback, to_pair
from medtune.data.hygiene import clean, hygiene_lines, scan_phi
from medtune.data.readers import Row, read_rows
from medtune.data.render import IGNORE, Dropped, Feedback, Pair, Sample, render
from medtune.errors import MedtuneError
from medtune.recipe import DataConfig, DataSource, Recipe
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
    hygiene: dict = field(default_factory=dict)  # decontamination, near-duplicates, PHI (data/hygiene.py)
    sources: dict[str, dict] = field(default_factory=dict)  # mixing: spec → {format, probability, read, held_out,
    # used (training rows drawn, repeats counted)}; {} = data.path alone

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
        out += hygiene_lines(self.hygiene)
        for spec, n in self.sources.items():
            out.append(f"  source {spec} ({n['format']}): p={n['probability']:.3f}, {n['read']} rows read, "
                       f"{n['held_out']} held out, {n['used']} training rows drawn")
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


def _halves(samples: list[Sample] | list[Pair] | list[Feedback]) -> list[Sample]:
    return [h for s in samples for h in ((s.chosen, s.rejected) if isinstance(s, Pair) else
                                         (s.sample,) if isinstance(s, Feedback) else (s,))]


def _clean_pairs(pairs: list[tuple], cfg, hygiene: dict | None) -> tuple[list[tuple], list[tuple[int, str]]]:
    """Hygiene for preference rows: decontamination and near-duplicates judge the chosen conversation (prompt +
    preferred answer); PHI is scanned (and redacted) in both conversations of a pair."""
    drops: list[tuple[int, str]] = []
    chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
    if hygiene is not None:
        chosen, found, drops = clean(chosen, cfg)
        hygiene.update(found)
    elif cfg.phi == "redact":
        chosen = scan_phi(chosen, "redact")[0]
    if cfg.phi == "redact":
        rejected = scan_phi(rejected, "redact")[0]
    by_row = {(r.source, r.row): r for r in rejected}
    return [(c, by_row[(c.source, c.row)]) for c in chosen], drops


def _render_rows(rows: list[Row], recipe: Recipe, tok, chat: ChatSetup, formats: list[DataConfig],
                 hygiene: dict | None = None) -> tuple[list[Sample] | list[Pair], PartReport, list]:
    """formats: each row's data settings (recipe.data, or its source's settings over it when mixing). hygiene: a
    dict to fill with the findings of data/hygiene.py, whose checks (recipe.data's) then run on these rows. Also
    returns each kept row's conversation up to and with its first answer (sample prompts drawn from held-out rows)."""
    cfg = recipe.data
    system = recipe.tokenizer.system_prompt
    preference, feedback = cfg.format == "preference", cfg.format == "feedback"
    report = PartReport(rows=len(rows))
    drops: list[tuple[int, str]] = []  # (row, reason), counted in row order
    examples = []
    settings = {}  # (file, row) → that row's data settings, for rendering it after the hygiene checks
    for row, row_cfg in zip(rows, formats, strict=True):
        try:
            ex = to_pair(row, row_cfg, system) if preference else to_feedback(row, row_cfg, system) if feedback \
                else to_example(row, row_cfg, system)
        except RowError as e:
            if row_cfg.on_bad_row == "error":
                raise
            drops.append((row.number, e.kind))
            continue
        examples.append(ex)
        first = ex[0] if preference else ex
        settings[(first.source, first.row)] = row_cfg
    if preference:
        examples, removed = _clean_pairs(examples, cfg, hygiene)
        drops += removed
    elif hygiene is not None:
        examples, found, removed = clean(examples, cfg)
        hygiene.update(found)
        drops += removed
    elif cfg.phi == "redact":  # eval rows: no identifiers either, the rest is only reported for training rows
        examples = scan_phi(examples, "redact")[0]
    samples, prompts = [], []
    for ex in examples:
        first = ex[0] if preference else ex
        row_cfg = settings[(first.source, first.row)]
        try:
            if preference:
                (chosen, cut_c), (rejected, cut_r) = (render(half, tok, row_cfg, chat.stop_tokens,
                                                             last_answer_only=True) for half in ex)
                sample, truncated = Pair(chosen, rejected), cut_c or cut_r
            else:
                sample, truncated = render(ex, tok, row_cfg, chat.stop_tokens, last_answer_only=feedback)
                sample = Feedback(sample, ex.label) if feedback else sample
        except Dropped as d:
            drops.append((first.row, d.reason))
            continue
        report.truncated += truncated
        samples.append(sample)
        prompts.append(_first_exchange(first))
    report.kept = len(samples)
    report.dropped = dict(Counter(reason for _, reason in sorted(drops, key=lambda d: d[0])))
    halves = _halves(samples)  # a preference pair counts as its two conversations
    report.tokens = sum(len(s.input_ids) for s in halves)
    report.loss_tokens = sum(s.num_loss_tokens for s in halves)
    report.length_percentiles = _percentiles([len(s.input_ids) for s in halves])
    return samples, report, prompts


def _first_exchange(ex) -> list[dict] | None:
    """The conversation up to and with its first answer (after any redaction); None for format=text."""
    if ex.messages is None:
        return None
    return ex.messages[: next(i for i, m in enumerate(ex.messages) if m["role"] == "assistant") + 1]


@dataclass
class PreparedData:
    train: list[Sample] | list[Pair] | list[Feedback]  # Pairs for data.format=preference, Feedback for feedback
    eval: list[Sample] | list[Pair] | list[Feedback]
    report: DataReport
    eval_prompts: list[list[dict] | None] = field(default_factory=list)  # each held-out row up to its first answer
    eval_references: list[str | None] = field(default_factory=list)  # that first answer: the sample's reference


def split_rows(rows: list[Row], ratio: float, seed: int) -> tuple[list[Row], list[Row]]:
    if ratio <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * ratio)))  # always leave a row to train on
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _read_source(spec: str, split: str, limit: int | None, where: str, max_row_bytes: int,
                 training: bool = True) -> list[Row]:
    """read_rows, with a mistake in the spec reported against the recipe key that named it (`where`)."""
    try:
        rows = read_rows(spec, split, max_row_bytes)
    except MedtuneError as e:
        if e.field != "data.path":
            raise
        raise MedtuneError(e.reason, file=e.file, row=e.row, field=where) from None
    rows = rows[:limit] if limit else rows
    if not rows and training:
        raise MedtuneError("no rows to train on", file=spec, field=where)
    return rows


def mix_sources(recipe: Recipe) -> tuple[list[Row], list[DataConfig], list[Row], list[DataConfig], dict[str, dict]]:
    """data.sources (or data.path) plus data.replay → one seeded interleaving of their training rows.

    Each source's held-out rows (data.eval_ratio, unless data.eval_path) are split off first, so that a row the
    mix repeats can never be on both sides. The sampling is datasets.interleave_datasets' own, on datasets of row
    indices (sources may have different columns, which interleave_datasets cannot mix); the rows are then looked
    up. Returns the training rows and each one's data settings (its source's format, columns and templates over
    data.*), the same for the held-out rows, and the per-source counts for the report.
    """
    from datasets import Dataset, interleave_datasets

    cfg = recipe.data
    sources = cfg.sources or [DataSource(path=cfg.path)]
    where = [f"data.sources[{i}].path" for i in range(len(cfg.sources))] or ["data.path"]
    weights = [s.weight for s in sources]
    probabilities = [w / sum(weights) * (1 - cfg.replay.share if cfg.replay.path else 1) for w in weights]
    formats = [cfg.model_copy(update={k: v for k, v in s.model_dump(exclude={"weight"}).items() if v is not None})
               for s in sources]
    if cfg.replay.path:
        sources = [*sources, DataSource(path=cfg.replay.path, format=cfg.replay.format, columns=cfg.replay.columns)]
        where.append("data.replay.path")
        probabilities.append(cfg.replay.share)
        formats.append(cfg.model_copy(update={"path": cfg.replay.path, "format": cfg.replay.format,
                                              "columns": cfg.replay.columns}))
    read = [_read_source(s.path, cfg.split, cfg.limit, w, cfg.max_row_bytes) for s, w in zip(sources, where, strict=True)]
    ratio = 0 if cfg.eval_path else cfg.eval_ratio
    parts = [split_rows(rows, ratio, recipe.train.seed) for rows in read]  # per source: (train, held out)
    indexed = [Dataset.from_dict({"source": [i] * len(train), "index": list(range(len(train)))})
               for i, (train, _) in enumerate(parts)]
    mixed = interleave_datasets(indexed, probabilities=probabilities, seed=recipe.train.seed,
                                stopping_strategy=cfg.stopping_strategy)
    picks = list(zip(mixed["source"], mixed["index"], strict=True))
    used = Counter(i for i, _ in picks)
    counts = {}
    for i, s in enumerate(sources):
        name = s.path if s.path not in counts else f"{s.path} #{i}"
        counts[name] = {"format": formats[i].format, "probability": probabilities[i], "read": len(read[i]),
                        "held_out": len(parts[i][1]), "used": used[i]}
    held = [(row, formats[i]) for i, (_, rows) in enumerate(parts) for row in rows]
    return ([parts[i][0][j] for i, j in picks], [formats[i] for i, _ in picks], [r for r, _ in held],
            [f for _, f in held], counts)


def prepare_data(recipe: Recipe, tok, chat: ChatSetup) -> PreparedData:
    cfg = recipe.data
    held_out = f"(held out: {cfg.eval_ratio:.0%}, seed {recipe.train.seed})"
    if cfg.sources or cfg.replay.path:
        train_rows, train_formats, eval_rows, eval_formats, counts = mix_sources(recipe)
        source = " + ".join(counts)
        eval_source = f"{source} {held_out}, each source split before mixing"
    else:
        rows, counts, source = _read_source(cfg.path, cfg.split, cfg.limit, "data.path", cfg.max_row_bytes), {}, cfg.path
        train_rows, eval_rows = (rows, []) if cfg.eval_path else split_rows(rows, cfg.eval_ratio, recipe.train.seed)
        train_formats, eval_formats = [cfg] * len(train_rows), [cfg] * len(eval_rows)
        eval_source = f"{cfg.path} {held_out}"
    if cfg.eval_path:
        eval_rows = _read_source(cfg.eval_path, cfg.split, None, "data.eval_path", cfg.max_row_bytes, training=False)
        eval_source = cfg.eval_path
        eval_formats = [cfg] * len(eval_rows)
    hygiene: dict = {}
    train, train_report, _ = _render_rows(train_rows, recipe, tok, chat, train_formats, hygiene)
    evals, eval_report, eval_turns = _render_rows(eval_rows, recipe, tok, chat, eval_formats)
    if not train:
        raise MedtuneError(f"every row was dropped ({train_report.dropped}); nothing to train on", file=source,
                           field="data.path")
    fmt = ", ".join(dict.fromkeys(c["format"] for c in counts.values())) or cfg.format
    report = DataReport(source, fmt, cfg.max_length, train_report, eval_report, eval_source,
                        example="\n".join(marked_text(tok, s) for s in _halves(train[:1])), hygiene=hygiene,
                        sources=counts)
    return PreparedData(train, evals, report, [t[:-1] if t else None for t in eval_turns],
                        [t[-1]["content"] if t else None for t in eval_turns])

"""`medtune eval`: load the model once, run each task (tuned, and base with the adapter off), compare, report.

Every task yields metrics plus per-item rows, so `--compare-base` can run a paired bootstrap on the same items:
  benchmarks  rows [acc, acc_norm, confidence, Brier]  metrics acc, acc_norm (+ stderr), ece, brier
  perplexity  rows [summed NLL, tokens]        metric perplexity (lower is better)
  rouge       rows [ROUGE-L, BLEU statistics]  metrics rougeL, bleu
  rubrics     rows [item rubric score]         metric score (+ bootstrap CI), per-tag subtasks; needs --judge
  medsafety   rows [refused, harmfulness]      metrics refusal_rate (+ harmfulness with a judge), per category
  overrefusal rows [refused, harmfulness]      metric overrefusal_rate (lower is better), per category
  probes      <benchmark>_{nota,falseconf,abstain}: rows and metrics in eval/probes.py
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from medtune.data.benchmark_files import BENCHMARKS, read_benchmark
from medtune.errors import MedtuneError
from medtune.eval.calibration import ece
from medtune.eval.compare import mean_of, paired_bootstrap, perplexity_of
from medtune.eval.harness import make_lm, run_benchmark
from medtune.eval.inputs import eval_recipe, read_dialogues, read_samples
from medtune.eval.judge import JudgeClassifier, chat_endpoint, make_judge
from medtune.eval.perplexity import Perplexity, perplexity
from medtune.eval.probes import NOT_OFFERED, PROBE_TASKS, probe_data, read_probe, run_probe
from medtune.eval.probes import statistics as probe_statistics
from medtune.eval.report import write_run_results
from medtune.eval.results import TaskResult
from medtune.eval.rouge import bleu, generate_batch, rouge_l, score
from medtune.eval.rubrics import grade, read_rubrics, score_items
from medtune.eval.safety import SAFETY_TASKS, category_intervals, data_for, read_items, run_safety
from medtune.eval.safety import statistics as safety_statistics
from medtune.generate import Loaded, load_for_inference
from medtune.run.meta import is_run_dir

log = logging.getLogger("medtune")
TASKS = ("perplexity", *BENCHMARKS, "rouge", "rubrics", *SAFETY_TASKS, *PROBE_TASKS)
GENERATION_DEFAULTS = {"rouge": 128, "rubrics": 128}  # --max-new-tokens when not given (safety tasks: their own)


@dataclass
class EvalOptions:
    model: str  # model name/folder or run directory
    tasks: list[str]
    data: dict[str, str] = field(default_factory=dict)  # task → file (benchmarks, and perplexity/rouge rows)
    recipe: str | None = None  # recipe whose data section reads perplexity/rouge rows (default: the run's)
    overrides: list[str] = field(default_factory=list)  # key=value on that recipe, e.g. data.format=qa
    fewshot: int = 0
    fewshot_data: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    batch_size: int = 16
    compare_base: bool = False
    all_tokens: bool = False
    window: int | None = None  # perplexity context; default: the run's max_length (2048 for a plain model)
    stride: int | None = None
    max_new_tokens: int | None = None  # None: the task's default (rouge 128, medsafety/overrefusal 96)
    bootstrap: int = 1000
    precision: str = "auto"
    device: str = "auto"
    progress: bool = True
    judge_url: str | None = None  # OpenAI-compatible endpoint that grades (rubrics; medsafety/overrefusal: refusal)
    judge_model: str | None = None
    judge_key: str | None = None  # default $MEDTUNE_JUDGE_KEY, else $OPENAI_API_KEY
    judge_timeout: float = 60.0  # seconds per judge request
    classifier: object | None = None  # medsafety/overrefusal: refusal.Classifier (e.g. a judge); None = offline rules


def check_options(opts: EvalOptions) -> None:
    for task in opts.tasks:
        if task in NOT_OFFERED:
            raise MedtuneError(NOT_OFFERED[task], field="--task")
    unknown = [t for t in opts.tasks if t not in TASKS]
    if unknown or not opts.tasks:
        raise MedtuneError(f"unknown task {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)}",
                           field="--task")
    if opts.compare_base and not is_run_dir(opts.model):
        raise MedtuneError("--compare-base needs a run directory (base model + adapter)", file=opts.model)
    for task in opts.tasks:
        if task == "rouge" and task not in opts.data and not is_run_dir(opts.model) and not opts.recipe:
            raise MedtuneError("rouge needs --data FILE (and data.format=... for its layout)", field="--data")
        if task == "perplexity" and task not in opts.data and not is_run_dir(opts.model):
            raise MedtuneError("perplexity of a plain model needs --data FILE", field="--data")
        check_task_data(task, opts)


def check_task_data(task: str, opts: EvalOptions) -> None:
    """Read and check the task's own file (and its judge), so a malformed one stops us before the model loads."""
    if task in BENCHMARKS:
        if task not in opts.data:
            raise MedtuneError(f"{task} needs its file: --data {task}=PATH", field="--data")
        read_benchmark(task, opts.data[task])
    if task in PROBE_TASKS:
        if opts.fewshot:
            raise MedtuneError(f"honesty probes are zero-shot: run {task} without --fewshot", field="--fewshot")
        read_probe(task, probe_data(task, opts.data), opts.limit)  # the benchmark's file unless TASK=PATH
    if task == "rubrics":
        _check_judge(opts)
        read_rubrics(opts.data.get(task), opts.limit)
    if task in SAFETY_TASKS:
        read_items(data_for(task, opts.data))
        if opts.judge_url:
            _check_judge(opts)


def _check_judge(opts: EvalOptions) -> None:
    if not opts.judge_url:
        raise MedtuneError("rubrics needs a judge: --judge URL --judge-model NAME (any OpenAI-compatible endpoint, "
                           "e.g. `medtune serve` of a larger model)", field="--judge")
    chat_endpoint(opts.judge_url)
    if not opts.judge_model:
        raise MedtuneError("the judge needs a model name: --judge-model NAME", field="--judge-model")


# One function per task kind: (loaded, opts, use_adapter) → (metrics, per-item rows, subtasks).

def _benchmark(task: str):
    def run(loaded: Loaded, opts: EvalOptions, use_adapter: bool, cache: dict):
        if "lm" not in cache:  # one lm-eval wrapper for the tuned and the base pass
            cache["lm"] = make_lm(loaded, opts.batch_size)
        r = run_benchmark(loaded, task, opts.data[task], fewshot=opts.fewshot, fewshot_data=opts.fewshot_data.get(task),
                          limit=opts.limit, use_adapter=use_adapter, lm=cache["lm"])
        rows = [[i["acc"], i["acc_norm"], i["confidence"], i["brier"]] for i in r.items]
        return r.metrics, rows, r.subtasks
    return run


def _probe(task: str):
    def run(loaded: Loaded, opts: EvalOptions, use_adapter: bool, cache: dict):
        if "lm" not in cache:
            cache["lm"] = make_lm(loaded, opts.batch_size)
        r = run_probe(loaded, task, probe_data(task, opts.data), limit=opts.limit, use_adapter=use_adapter,
                      lm=cache["lm"])
        return r.metrics, r.rows, r.subtasks
    return run


def _perplexity(loaded: Loaded, opts: EvalOptions, use_adapter: bool, cache: dict):
    if "samples" not in cache:
        data = opts.data.get("perplexity")
        recipe = eval_recipe(opts.model, data, opts.recipe, opts.overrides)
        samples = read_samples(recipe, loaded.tok, held_out=data is None)
        cache["samples"] = samples[: opts.limit] if opts.limit else samples
    p = perplexity(loaded, cache["samples"], window=opts.window, stride=opts.stride, batch_size=max(1, opts.batch_size // 2),
                   all_tokens=opts.all_tokens, use_adapter=use_adapter, progress=opts.progress)
    return p.scores()


def _rouge(loaded: Loaded, opts: EvalOptions, use_adapter: bool, cache: dict):
    if "dialogues" not in cache:
        cache["dialogues"] = read_dialogues(eval_recipe(opts.model, opts.data.get("rouge"), opts.recipe,
                                                        opts.overrides), opts.limit)
    dialogues = cache["dialogues"]
    answers = generate_batch(loaded, [d[0] for d in dialogues], max_new_tokens=opts.max_new_tokens or GENERATION_DEFAULTS["rouge"],
                             batch_size=max(1, opts.batch_size // 2), use_adapter=use_adapter, progress=opts.progress)
    metrics, rows = score(answers, [d[1] for d in dialogues])
    return metrics, rows, {}


def _rubrics(loaded: Loaded, opts: EvalOptions, use_adapter: bool, cache: dict):
    if "items" not in cache:
        cache["items"] = read_rubrics(opts.data.get("rubrics"), opts.limit)
        cache["judge"] = make_judge(opts.judge_url, opts.judge_model, opts.judge_key, opts.judge_timeout)
    items = cache["items"]
    answers = generate_batch(loaded, [i.prompt for i in items],
                             max_new_tokens=opts.max_new_tokens or GENERATION_DEFAULTS["rubrics"],
                             batch_size=max(1, opts.batch_size // 2), use_adapter=use_adapter, progress=opts.progress)
    return score_items(items, grade(cache["judge"], items, answers, opts.progress), opts.bootstrap)


def _safety(task: str):
    def run(loaded: Loaded, opts: EvalOptions, use_adapter: bool, cache: dict):
        if "items" not in cache:
            cache["items"] = read_items(data_for(task, opts.data), opts.limit)
            cache["classifier"] = opts.classifier or _judge_classifier(opts)
        kw = {} if opts.max_new_tokens is None else {"max_new_tokens": opts.max_new_tokens}
        return run_safety(loaded, task, cache["items"], classifier=cache["classifier"],
                          batch_size=max(1, opts.batch_size // 2), use_adapter=use_adapter, progress=opts.progress, **kw)
    return run


def _judge_classifier(opts: EvalOptions) -> JudgeClassifier | None:
    """With --judge, the judge labels refusals and scores harmfulness; else None (the offline phrase rules)."""
    client = make_judge(opts.judge_url, opts.judge_model, opts.judge_key, opts.judge_timeout)
    return JudgeClassifier(client) if client is not None else None


RUNNERS = {"perplexity": _perplexity, "rouge": _rouge, "rubrics": _rubrics, **{b: _benchmark(b) for b in BENCHMARKS},
           **{t: _safety(t) for t in SAFETY_TASKS}, **{p: _probe(p) for p in PROBE_TASKS}}


def _statistics(task: str) -> dict[str, tuple]:
    """metric → (statistic over per-item rows, higher is better)."""
    if task == "perplexity":
        return {"perplexity": (perplexity_of, False)}
    if task == "rouge":
        return {"rougeL": (rouge_l, True), "bleu": (lambda rows: bleu(rows.tolist()), True)}
    if task == "rubrics":
        return {"score": (mean_of(0), True)}
    if task in SAFETY_TASKS:
        return safety_statistics(task)
    if task in PROBE_TASKS:
        return probe_statistics(task)
    return {"acc": (mean_of(0), True), "acc_norm": (mean_of(1), True),
            "ece": (lambda rows: ece(rows[:, 2], rows[:, 0]), False), "brier": (mean_of(3), False)}


def run_task(loaded: Loaded, task: str, opts: EvalOptions, cache: dict | None = None) -> TaskResult:
    """One task on the loaded model (and, with compare_base, on its base: adapter off, same items). `cache` may
    already hold the task's items (perplexity: "samples") and scores measured earlier ("scores", see scores_of)."""
    cache = {} if cache is None else cache
    metrics, rows, subtasks = scores_of(loaded, task, opts, True, cache)
    if not opts.compare_base:
        return TaskResult(task, metrics, subtasks=subtasks)
    base, base_rows, base_subtasks = scores_of(loaded, task, opts, False, cache)
    delta = {metric: paired_bootstrap(np.asarray(base_rows), np.asarray(rows), stat, iters=opts.bootstrap,
                                      higher_is_better=higher)
             for metric, (stat, higher) in _statistics(task).items() if metric in metrics}
    if subtasks:
        subtasks = {name: {"base": base_subtasks[name], "tuned": m} for name, m in subtasks.items()}
    if subtasks and task in SAFETY_TASKS:  # one interval per category too
        subtasks = category_intervals(task, cache["items"], base_rows, rows, subtasks, opts.bootstrap)
    return TaskResult(task, metrics, base, delta, subtasks)


def scores_of(loaded: Loaded, task: str, opts: EvalOptions, use_adapter: bool, cache: dict) -> tuple:
    """The task's (metrics, per-item rows, subtasks) with the adapter on or off: cache["scores"][use_adapter] when
    it was measured earlier on the cache's items, else measured now and kept there."""
    known = cache.setdefault("scores", {})
    if use_adapter not in known:
        log.info("eval %s (%s)...", task, ("tuned" if loaded.has_adapter else "model") if use_adapter else "base")
        known[use_adapter] = RUNNERS[task](loaded, opts, use_adapter, cache)
    return known[use_adapter]


def held_out_cache(held_out, base: Perplexity | None, tuned: Perplexity | None) -> dict[str, dict]:
    """`caches` for run_eval with what the training job measured on its held-out texts (eval.perplexity, adapter
    off before training and on after it), so that the perplexity task does not score them again."""
    if not held_out:
        return {}
    scores = {use_adapter: p.scores() for use_adapter, p in ((False, base), (True, tuned)) if p is not None}
    return {"perplexity": {"samples": held_out, "scores": scores}}


def run_eval(opts: EvalOptions, loaded: Loaded | None = None, caches: dict[str, dict] | None = None) -> list[TaskResult]:
    """Every task of opts on one loaded model (loaded here unless given); `caches` by task, see run_task."""
    check_options(opts)
    if loaded is None:
        loaded = load_for_inference(opts.model, device=opts.device, precision=opts.precision)
    caches = caches or {}
    return [run_task(loaded, task, opts, caches.get(task)) for task in opts.tasks]


def parse_paths(values: list[str] | None, tasks: list[str], flag: str) -> dict[str, str]:
    """`--data PATH` (one task) or `--data TASK=PATH` (repeatable) → {task: path}."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if sep and name in TASKS:
            out[name] = path
        elif len(tasks) == 1:
            out[tasks[0]] = value
        else:
            raise MedtuneError(f"with several tasks, write {flag} TASK=PATH (got {value!r})", field=flag)
    return out


def parse_tasks(values: list[str]) -> list[str]:
    """`--task a,b --task c` → [a, b, c], in order, without repeats."""
    return list(dict.fromkeys(t.strip() for v in values for t in v.split(",") if t.strip()))


def after_train(recipe, run_dir, loaded: Loaded, held_out=None, base: Perplexity | None = None,
                tuned: Perplexity | None = None) -> list[TaskResult]:
    """The recipe's `eval.after_train` tasks on the freshly trained model, written to RUN/eval and the card.
    `base`/`tuned`: Perplexity on the `held_out` samples measured by the training job (before and after training);
    the perplexity task scores those samples and reuses them instead of scoring them again."""
    cfg = recipe.eval
    caches = held_out_cache(held_out, base, tuned) if not cfg.limit else {}
    data = {t: getattr(cfg, t) for t in cfg.after_train if t != "perplexity" and getattr(cfg, t)}
    opts = EvalOptions(model=str(run_dir), tasks=list(cfg.after_train), data=data, fewshot=cfg.fewshot,
                       fewshot_data=dict(cfg.fewshot_data), limit=cfg.limit, batch_size=16,
                       compare_base=cfg.compare_base)
    results = run_eval(opts, loaded, caches)
    write_run_results(run_dir, results, model=str(run_dir), command="eval.after_train", fewshot=cfg.fewshot, data=data,
                      limit=cfg.limit)
    return results

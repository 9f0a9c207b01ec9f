"""`medtune eval` and `medtune gate`: score a model or run on tasks; judge a run base vs tuned, axis by axis."""

from __future__ import annotations

import argparse
from pathlib import Path

from medtune.commands.common import DEVICES, PRECISIONS, args_for, command_line, options_from_args
from medtune.lazy import lazy
from medtune.run.layout import GATE, GATE_PLOT
from medtune.run.meta import is_run_dir

gate = lazy("medtune.eval.gate")
report = lazy("medtune.eval.report")
suite = lazy("medtune.eval.suite")

COMMAND_ONLY = ("json", "no_save")  # eval flags that are not EvalOptions fields: what the command writes


def precision_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto = bf16 where fast")
    p.add_argument("--device", default="auto", choices=DEVICES)


def register(sub) -> None:
    register_eval(sub)
    register_gate(sub)


def register_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, medical benchmarks (lm-eval), ROUGE; base vs tuned with CIs",
                       description="Evaluate a model or a run. Benchmarks (medqa, pubmedqa, mmlu_medical, medmcqa) are "
                       "read from local files in their public layouts and scored by log-likelihood with "
                       "lm-evaluation-harness. Results of a run go to RUN/eval/<task>.json/.md and its model card.")
    p.add_argument("model", help="model name (smollm2-135m-instruct), model folder, or run directory")
    p.add_argument("--task", dest="tasks", metavar="TASK", action="append", required=True,
                   help="perplexity, medqa, pubmedqa, mmlu_medical, medmcqa, "
                   "rouge, rubrics (long answers graded by --judge; default data demo:rubrics), medsafety (refusal "
                   "rate on harmful requests), overrefusal (refusal rate on benign questions); honesty probes "
                   "<benchmark>_nota (correct option's text replaced by 'None of the above'; not for pubmedqa, which "
                   "has no option texts), <benchmark>_falseconf (a wrong answer suggested: acc, agree_rate), "
                   "<benchmark>_abstain (an 'I do not know' option: abstain_rate, answered_acc; aurc, acc_at_50/80 "
                   "from the original items' confidence), zero-shot; repeatable or comma-separated")
    p.add_argument("--data", action="append", metavar="[TASK=]PATH", help="the task's file (mmlu_medical: a folder of "
                   "<subject>_<split>.csv; medsafety: a MedSafetyBench folder of category_N.csv or a .txt/.jsonl/.csv "
                   "of prompts; overrefusal: the same plain layouts, default demo:benign); a probe reads its "
                   "benchmark's (--data medqa=PATH serves medqa_nota too); perplexity of a run defaults to its "
                   "held-out split")
    p.add_argument("--fewshot", type=int, default=0, help="k-shot benchmark prompts (shots from --fewshot-data)")
    p.add_argument("--fewshot-data", action="append", metavar="[TASK=]PATH", help="file the shots come from (first k)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items (per MMLU subject, per safety "
                   "category)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--compare-base", action="store_true", help="also evaluate the base (adapter off) on the same "
                   "items: delta and 95%% paired-bootstrap interval per metric")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for --compare-base")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results to FILE")
    p.add_argument("--no-save", action="store_true", help="do not write RUN/eval/ or touch the model card")
    p.add_argument("--all-tokens", action="store_true", help="perplexity over every token, not only the answers")
    p.add_argument("--window", type=int, default=None, help="perplexity context window (default: the run's max_length)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window step for long texts (default window/2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest generated answer (default: rouge and "
                   "rubrics 128, medsafety/overrefusal 96)")
    p.add_argument("--recipe", default=None, help="recipe whose data section reads --data for perplexity/rouge "
                   "(default: the run's own)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", help="recipe override for reading --data, e.g. "
                   "data.format=qa (repeatable)")
    p.add_argument("--judge", dest="judge_url", metavar="URL", default=None, help="OpenAI-compatible endpoint that grades answers "
                   "(rubrics), e.g. http://127.0.0.1:8000/v1 of `medtune serve`, or a hosted API")
    p.add_argument("--judge-model", metavar="NAME", default=None, help="the judge's model name (its `model` field)")
    p.add_argument("--judge-key", metavar="KEY", default=None, help="the judge's API key (default: "
                   "$MEDTUNE_JUDGE_KEY, else $OPENAI_API_KEY, else none)")
    p.add_argument("--judge-timeout", type=float, default=60.0, metavar="SECONDS", help="longest wait for one "
                   "judge answer (429/5xx are retried 3 times with backoff; any other failure stops the eval)")
    precision_device_args(p)
    p.set_defaults(func=cmd_eval)


def register_gate(sub) -> None:
    p = sub.add_parser("gate", help="release gate: base vs tuned on a suite, a verdict per axis, exit 1 on a regression",
                       description="Run a suite of `medtune eval` tasks on the run with the adapter on and off (same "
                       "items, one model load) and judge every axis (task.metric) with its 95%% paired-bootstrap "
                       "interval: improved (interval entirely on the better side of 0), regressed (entirely on the "
                       "worse side and the delta worse than the axis's tolerance; require: non_inferior: the "
                       "interval's worse end past the tolerance), else no significant change. The suite comes from "
                       "--config (a gate.yaml with the recipe's gate: keys) or the run's recipe `gate:` section; "
                       "default: held-out perplexity plus every task given a file. Writes RUN/gate.json, "
                       "RUN/plots/gate.png and the card's Release gate section. Exit 0: no gating axis regressed; "
                       "1: one did (named, one line each); 2: a mistake in the input.")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--config", metavar="GATE.YAML", default=None, help="the gate's config: tasks, data, axes "
                   "(tolerance, gating, require), limit, bootstrap, options (default: the run's recipe gate: section)")
    p.add_argument("--data", action="append", metavar="TASK=PATH", help="a task's file, added to the suite (medqa, "
                   "pubmedqa, mmlu_medical (a folder), medmcqa, rouge; perplexity=FILE instead of the held-out split)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each task")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples per axis (default 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    precision_device_args(p)
    p.set_defaults(func=cmd_gate)


def cmd_eval(args) -> int:
    tasks = suite.parse_tasks(args.tasks)
    opts = options_from_args(suite.EvalOptions, args, tasks=tasks, data=suite.parse_paths(args.data, tasks, "--data"),
                             fewshot_data=suite.parse_paths(args.fewshot_data, tasks, "--fewshot-data"),
                             overrides=args.overrides or [])
    results = suite.run_eval(opts)
    context = {"model": args.model, "command": command_line(), "fewshot": args.fewshot, "limit": args.limit,
               "data": opts.data}
    print(report.markdown(results))
    if is_run_dir(args.model) and not args.no_save:
        written = report.write_run_results(args.model, results, **context)
        print(f"\nresults: {', '.join(map(str, written))} (and the model card)")
    if args.json:
        print(f"results: {report.write_json(args.json, report.to_json(results, **context))}")
    return 0


def cmd_gate(args) -> int:
    cfg = gate.gate_config(args.run, **args_for(gate.gate_config, args))
    outcome = gate.run_gate(args.run, cfg, command=command_line(), batch_size=args.batch_size, precision=args.precision,
                       device=args.device)
    print(gate.format_gate(outcome))
    print(f"\nresults: {Path(args.run) / GATE}, {Path(args.run) / GATE_PLOT} (and the model card)")
    return 0 if outcome["passed"] else 1

"""`medtune bench eval`: log-likelihood scoring speed of medtune's eval path vs lm-eval's HF backend, same items.

The benchmark file is read once and written as lm-eval task YAMLs (`medtune.eval.benchmarks`) in a temp folder;
every system scores exactly those tasks, each in its OWN subprocess, one after another:

  lm-eval-cli  the `lm_eval` command line as a user runs it: `lm_eval run --model hf --model_args pretrained=DIR
               --tasks ... --include_path TMP --log_samples` (all defaults: checkpoint dtype, batch 1). Its wall
               time includes Python start-up and model load, so only its accuracy is compared (the trust check).
  lm-eval      the same backend through the Python API: `HFLM(pretrained=DIR)` with its defaults, then
               `simple_evaluate`; scoring time measured apart from loading.
  medtune      `medtune.eval.harness.run_benchmark` on `load_for_inference(DIR)`: what `medtune eval` does.
               Faster by design (see the harness module): a bf16 model object where the CPU has fast bf16,
               batches of 16, inference_mode, and the output layer at the continuation positions only;
               requests sorted longest-first and grouped by shared context (as lm-eval does).

  medsafety    generation speed: `medtune eval --task medsafety` on MedSafetyBench (--medsafety-data, default
               ../shared/data/safety/medsafetybench/train, --medsafety-limit items per category): greedy answers of
               up to 96 tokens, batched, each classified refuse / comply; items/s over answering and classifying,
               and the refusal rate.

Reported per system: items, scoring seconds, items/s, acc (and acc_norm), items where its per-item accuracy
agrees with lm-eval's; medtune/lm-eval ratio of items/s. Threads: torch's default (OMP_NUM_THREADS respected).
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from medtune.bench import harness
from medtune.bench.harness import (
    fmt,
    machine_info,
    run_worker_process,
    system_rows,
    worker_env,
    worker_main,
    write_json,
)
from medtune.errors import MedtuneError
from medtune.recipe import DEFAULT_MODEL

SYSTEMS = ("lm-eval-cli", "lm-eval", "medtune", "medsafety")
SHARED_EVAL = Path("..") / "shared" / "data" / "eval"
SHARED_MEDSAFETY = Path("..") / "shared" / "data" / "safety" / "medsafetybench" / "train"
DEFAULT_DATA = {"pubmedqa": "pubmedqa_dev.json", "mmlu_medical": "mmlu_medical/val", "medqa": "medqa_4opt_sample.jsonl"}


@dataclass
class EvalBenchConfig:
    model: str = DEFAULT_MODEL
    task: str = "pubmedqa"
    data: str | None = None  # default: ../shared/data/eval/<the task's file>
    limit: int | None = 100
    systems: tuple[str, ...] = SYSTEMS
    batch_size: int = 16  # medtune's
    precision: str = "auto"  # medtune's
    timeout: float | None = None
    medsafety_data: str | None = None  # default: ../shared/data/safety/medsafetybench/train
    medsafety_limit: int | None = 10  # items per category (9 categories: 90 items)


def _shared(relative: Path) -> Path | None:
    repo = Path(__file__).resolve().parents[3]
    for base in (repo, Path.cwd()):
        candidate = (base / relative).resolve()
        if candidate.exists():
            return candidate
    return None


def find_data(task: str, spec: str | None) -> str:
    if spec:
        return spec
    if task not in DEFAULT_DATA:
        raise MedtuneError(f"no default file for {task}; pass --data", field="--data")
    found = _shared(SHARED_EVAL / DEFAULT_DATA[task])
    if found is None:
        raise MedtuneError(f"{SHARED_EVAL / DEFAULT_DATA[task]} not found; pass --data", field="--data")
    return str(found)


def find_medsafety(spec: str | None) -> str:
    """--medsafety-data, else the shared MedSafetyBench folder next to the repo (or the cwd)."""
    found = spec or _shared(SHARED_MEDSAFETY)
    if found is None:
        raise MedtuneError(f"{SHARED_MEDSAFETY} not found; pass --medsafety-data, or leave medsafety out of --systems",
                           field="--medsafety-data")
    return str(found)


parse_systems = partial(harness.parse_systems, choices=SYSTEMS)


# ---- workers (each in its own process) --------------------------------------------------------------------------

def _items(out: dict, names: list[str]) -> list[float]:
    """Per-item acc in task then document order, from lm-eval's samples."""
    return [float(s["acc"]) for n in names for s in sorted(out["samples"][n], key=lambda s: s["doc_id"])]


def _lm_eval_worker(cfg: dict) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    # lm-eval's defaults, as `--model_args pretrained=DIR`; the API defaults to cuda, the CLI falls back to cpu
    lm = HFLM(pretrained=cfg["model_dir"], device="cuda" if torch.cuda.is_available() else "cpu")
    tasks = TaskManager(include_path=cfg["task_dir"], include_defaults=False)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=cfg["names"], task_manager=tasks, log_samples=True)
    return {"load_s": load_s, "score_s": time.perf_counter() - start, "items_acc": _items(out, cfg["names"]),
            "dtype": str(lm.model.dtype), "batch_size": lm.batch_size}


def _medtune_worker(cfg: dict) -> dict:
    import torch

    from medtune.eval.harness import run_benchmark
    from medtune.generate import load_for_inference

    start = time.perf_counter()
    loaded = load_for_inference(cfg["model_dir"], precision=cfg["precision"])
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    r = run_benchmark(loaded, cfg["task"], cfg["data"], limit=cfg["limit"], batch_size=cfg["batch_size"])
    return {"load_s": load_s, "score_s": time.perf_counter() - start, "items_acc": [i["acc"] for i in r.items],
            "dtype": str(next(loaded.model.parameters()).dtype), "batch_size": cfg["batch_size"],
            "threads": torch.get_num_threads()}


def _medsafety_worker(cfg: dict) -> dict:
    from medtune.eval.safety import read_items, run_safety
    from medtune.generate import load_for_inference

    items = read_items(cfg["medsafety_data"], cfg["medsafety_limit"])
    start = time.perf_counter()
    loaded = load_for_inference(cfg["model_dir"], precision=cfg["precision"])
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics, _, _ = run_safety(loaded, "medsafety", items, batch_size=max(1, cfg["batch_size"] // 2), progress=False)
    return {"load_s": load_s, "score_s": time.perf_counter() - start, "items": len(items), "acc": None,
            "items_per_s": metrics["items_per_s"], "refusal_rate": metrics["refusal_rate"],
            "dtype": str(next(loaded.model.parameters()).dtype), "batch_size": max(1, cfg["batch_size"] // 2)}


def run_worker(system: str, cfg: dict) -> dict:
    workers = {"medtune": _medtune_worker, "medsafety": _medsafety_worker}
    return workers.get(system, _lm_eval_worker)(cfg)


def _cli(cfg: dict, out_dir: Path, timeout: float | None) -> dict:
    """The real `lm_eval` command line; acc per item from its --log_samples files."""
    exe = Path(sys.executable).with_name("lm_eval")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lm_eval"]
    cmd += ["run", "--model", "hf", "--model_args", f"pretrained={cfg['model_dir']}", "--tasks", ",".join(cfg["names"]),
            "--include_path", cfg["task_dir"], "--output_path", str(out_dir), "--log_samples"]
    start = time.perf_counter()
    import subprocess

    try:
        proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {"error": f"exit code {proc.returncode}: {tail[-1] if tail else ''}", "command": shlex.join(cmd)}
    items = []
    for name in cfg["names"]:
        [path] = sorted(out_dir.rglob(f"samples_{name}_*.jsonl"))[-1:]
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        items += [float(r["acc"]) for r in sorted(rows, key=lambda r: r["doc_id"])]
    return {"wall_s": wall, "items_acc": items, "command": shlex.join(cmd), "dtype": "checkpoint (auto)",
            "batch_size": 1}


# ---- harness -------------------------------------------------------------------------------------------------

def run_bench(cfg: EvalBenchConfig, *, json_path: str | Path | None = None, command: str | None = None) -> dict:
    import os

    from medtune.eval.harness import prepare_tasks
    from medtune.models import resolve_model

    model_dir = resolve_model(cfg.model)
    data = find_data(cfg.task, cfg.data)
    medsafety = find_medsafety(cfg.medsafety_data) if "medsafety" in cfg.systems else None
    load_before = os.getloadavg()
    systems: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="medtune-bench-eval-") as tmp:
        task_dir = Path(tmp) / "tasks"
        names, subsets = prepare_tasks(cfg.task, data, task_dir, limit=cfg.limit)
        wcfg = {"model_dir": model_dir, "task": cfg.task, "data": data, "limit": cfg.limit, "names": names,
                "task_dir": str(task_dir), "batch_size": cfg.batch_size, "precision": cfg.precision,
                "medsafety_data": medsafety, "medsafety_limit": cfg.medsafety_limit}
        for system in cfg.systems:
            print(f"[bench eval] {system} ...", file=sys.stderr, flush=True)
            if system == "lm-eval-cli":
                systems[system] = _cli(wcfg, Path(tmp) / "cli-out", cfg.timeout)
                continue
            systems[system] = run_worker_process("medtune.bench.eval_speed", wcfg, system=system, timeout=cfg.timeout)
    result = assemble(systems, n_items=sum(len(s.items) for s in subsets))
    result.update(config={**asdict(cfg), "model_dir": model_dir, "data": data, "tasks": names,
                          "medsafety_data": medsafety},
                  machine={**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
                  command=command)
    write_json(json_path, result)
    return result


def assemble(systems: dict[str, dict], n_items: int) -> dict:
    """Per system: acc, items/s (scoring only), agreement with lm-eval per item; medtune/lm-eval speed ratio."""
    reference = next((systems[k]["items_acc"] for k in ("lm-eval", "lm-eval-cli")
                      if k in systems and "items_acc" in systems[k]), None)
    for s in systems.values():
        items = s.pop("items_acc", None)
        if items is None:
            continue
        s["items"] = len(items)
        s["acc"] = sum(items) / len(items) if items else float("nan")
        if "score_s" in s:
            s["items_per_s"] = len(items) / s["score_s"] if s["score_s"] > 0 else float("nan")
        if reference is not None and len(reference) == len(items):
            s["agree_with_lm_eval"] = sum(a == b for a, b in zip(items, reference, strict=True))
    ratio = None
    if all("items_per_s" in systems.get(k, {}) for k in ("medtune", "lm-eval")):
        ratio = systems["medtune"]["items_per_s"] / systems["lm-eval"]["items_per_s"]
    acc_gap = None
    if all("acc" in systems.get(k, {}) for k in ("medtune", "lm-eval-cli")):
        acc_gap = 100 * (systems["medtune"]["acc"] - systems["lm-eval-cli"]["acc"])
    return {"systems": systems, "n_items": n_items, "speedup_vs_lm_eval": ratio, "acc_points_vs_cli": acc_gap}


def _row(name: str, s: dict) -> str:
    agree = f"{s['agree_with_lm_eval']}/{s['items']}" if "agree_with_lm_eval" in s else "-"
    return (f"{name:<12} {s['items']:>5} {fmt(s.get('items_per_s'), '8.2f')} {fmt(s.get('score_s'), '8.1f')} "
            f"{fmt(s.get('load_s'), '7.1f')} {fmt(s.get('wall_s'), '7.1f')} {fmt(s['acc'], '7.4f')} "
            f"{agree:>6} {str(s.get('dtype', '-')):>16} {s.get('batch_size', '-')!s:>5}")


def format_table(result: dict) -> str:
    c, m = result["config"], result["machine"]
    head = (f"{'system':<12} {'items':>5} {'items/s':>8} {'score s':>8} {'load s':>7} {'wall s':>7} {'acc':>7} "
            f"{'agree':>6} {'dtype':>16} {'batch':>5}")
    lines = [f"medtune bench eval: {c['model']} | {c['task']} ({', '.join(c['tasks'])}) | {result['n_items']} items | "
             f"{c['data']}",
             f"{m['torch_threads']} threads | load avg {m['loadavg_before'][0]:.2f} -> {m['loadavg_after'][0]:.2f}",
             "", *system_rows(result["systems"], head, 12, _row)]
    notes = []
    if result.get("speedup_vs_lm_eval") is not None:
        notes.append(f"items/s medtune/lm-eval {result['speedup_vs_lm_eval']:.2f}x")
    if result.get("acc_points_vs_cli") is not None:
        notes.append(f"acc medtune - lm_eval CLI {result['acc_points_vs_cli']:+.2f} points")
    safety = result["systems"].get("medsafety", {})
    if "refusal_rate" in safety:
        notes.append(f"medsafety: generation (<= 96 new tokens, greedy) + refusal classifier on {safety['items']} "
                     f"MedSafetyBench items ({c['medsafety_data']}); refusal rate {safety['refusal_rate']:.3f}")
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, run_worker, prog="python -m medtune.bench.eval_speed",
                       description="One benchmark worker (run by `medtune bench eval`).",
                       systems=("lm-eval", "medtune", "medsafety"))


if __name__ == "__main__":
    sys.exit(main())

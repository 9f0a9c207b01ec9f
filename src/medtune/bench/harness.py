"""What every `medtune bench …` shares: a system run in its own Python process (`python -m MODULE --worker …
--config JSON`, the worker's last stdout JSON line is its result), its wall time and peak RSS, the machine it ran
on, strict JSON output and the table helpers."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from medtune.errors import MedtuneError


def parse_systems(text: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """--systems "a, b,a" → ("a", "b"), each one of `choices`."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in choices]
    if unknown or not names:
        raise MedtuneError(f"unknown system {', '.join(unknown) or '(none)'}; choose from {','.join(choices)}",
                           field="--systems")
    return tuple(dict.fromkeys(names))


# ---- the parent: one worker process per system --------------------------------------------------------------

def worker_env() -> dict[str, str]:
    env = dict(os.environ)  # threads: torch's default, or the user's OMP_NUM_THREADS; we set nothing
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"  # the model is already resolved to a local folder, the data is a local file
    env["HF_DATASETS_OFFLINE"] = "1"
    env.setdefault("WANDB_MODE", "disabled")
    return env


def run_worker_process(module: str, config: dict, *, system: str | None = None, timeout: float | None = None,
                       stream: bool = False) -> dict:
    """`python -m module --worker [system] --config JSON` with `worker_env()`; its result plus `wall_s`."""
    cmd = [sys.executable, "-m", module, "--worker", *([system] if system else []), "--config", json.dumps(config)]
    result, wall = run_subprocess(cmd, env=worker_env(), timeout=timeout, stream=stream)
    result["wall_s"] = wall
    return result


def run_subprocess(cmd: list[str], *, env: dict | None = None, timeout: float | None = None,
                   stream: bool = False) -> tuple[dict, float]:
    """Run a worker; its last stdout line that is a JSON object is its result. Anything else is an error result."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None if stream else subprocess.PIPE,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}, time.perf_counter() - start
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(result, dict):
                if proc.returncode != 0 and "error" not in result:
                    result["error"] = f"exit code {proc.returncode}"
                return result, wall
    tail = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
    why = tail[-1].strip() if tail else "no output (see stderr above)" if stream else "no output"
    return {"error": f"exit code {proc.returncode}: {why}", "stderr_tail": "\n".join(tail[-30:])}, wall


# ---- the worker ------------------------------------------------------------------------------------------------

def worker_main(argv: list[str] | None, run: Callable[..., dict], *, prog: str, description: str,
                systems: tuple[str, ...] | None = None) -> int:
    """A worker's entry point: `--worker SYSTEM` (or a bare `--worker`) and `--config JSON` → `run([system,] cfg)`,
    printed as one JSON line with the worker's peak RSS and time; an exception becomes an `error` result."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    if systems:
        p.add_argument("--worker", required=True, choices=systems)
    else:
        p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--config", required=True, help="JSON object (see the bench's run function)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        cfg = json.loads(args.config)
        result = run(args.worker, cfg) if systems else run(cfg)
    except Exception as e:  # reported in the JSON; the other systems still run
        traceback.print_exc()
        result = {"error": error_text(e)}
    result.update(peak_rss_mb=peak_rss_mb(), worker_s=time.perf_counter() - start)
    if systems:
        result["system"] = args.worker
    sys.stdout.flush()
    print(json.dumps(result, default=str), flush=True)
    return 1 if result.get("error") else 0


def error_text(error: Exception) -> str:
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---- results -----------------------------------------------------------------------------------------------------

def machine_info() -> dict:
    import torch

    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    versions = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = None
    return {"cpu": cpu or platform.processor(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "memory_gib": round(mem, 1),
            "cpu_bf16_flags": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
            "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def finite(obj):
    """NaN/inf → None, so the JSON file is strict JSON that any tool reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str | Path | None, result: dict) -> None:
    """The result as strict JSON (NaN → null, anything else unknown → its str), when a path is given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(finite(result), indent=2, default=str) + "\n", encoding="utf-8")


def fmt(value, spec: str) -> str:
    """A table cell: "-" for a missing or non-finite figure."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def system_rows(systems: dict[str, dict], head: str, width: int, row: Callable[[str, dict], str]) -> list[str]:
    """The header, its rule, then one line per system: `row(name, result)`, or the system's error."""
    lines = [head, "-" * len(head)]
    for name, s in systems.items():
        lines.append(f"{name:<{width}} error: {s['error']}" if s.get("error") else row(name, s))
    return lines

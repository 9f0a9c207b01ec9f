"""The JSON summary of bench/gpu_check.sh: what ran on which GPU with which versions, and what came out.

    python bench/gpu_summary.py --out SUMMARY.json [--junit JUNIT.xml --tests-rc N] [--bench BENCH.json
                                --bench-rc N] [--phase NAME=SECONDS ...] [--note TEXT]

Reads pytest's JUnit report of `pytest -m gpu` (counts, failures, skip reasons, and the `memory_*` properties the
memory test records) and the `medtune bench train --json` file, measures this GPU's bf16 matmul peak once more (the
denominator of `mfu_cuda_bf16_pct`; `medtune bench train` measures it too, before and after its workers) and writes
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "flash-attn", "liger-kernel")
SYSTEM_KEYS = ("tokens_per_s", "tokens_per_s_median", "tokens_per_step", "loss", "loss_equal_tokens", "peak_rss_mb",
               "wall_s", "error")


def junit_results(path: Path) -> dict:
    """Counts, failures (test id and first message line), skip reasons with their counts, recorded properties."""
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": 0.0, "failures": [], "skip_reasons": {},
           "properties": {}}
    suites = ET.parse(path).getroot().iter("testsuite")
    for suite in suites:
        out["seconds"] += float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            for prop in case.iter("property"):
                value = prop.get("value", "")
                try:
                    out["properties"][prop.get("name")] = json.loads(value)
                except json.JSONDecodeError:
                    out["properties"][prop.get("name")] = value
            bad = next((c for c in case if c.tag in ("failure", "error")), None)
            skipped = case.find("skipped")
            if bad is not None:
                out["errors" if bad.tag == "error" else "failed"] += 1
                out["failures"].append({"test": name, "message": (bad.get("message") or "").split("\n", 1)[0]})
            elif skipped is not None:
                out["skipped"] += 1
                reason = skipped.get("message") or ""
                out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
            else:
                out["passed"] += 1
    out["total"] = out["passed"] + out["failed"] + out["errors"] + out["skipped"]
    return out


def bench_results(path: Path, cuda_peak_tflops: float | None) -> dict:
    """`medtune bench train --json`'s figures per system, with MFU against this GPU's measured bf16 peak."""
    bench = json.loads(path.read_text(encoding="utf-8"))
    fpt = bench.get("flops_per_token")
    systems = {}
    for name, s in bench.get("systems", {}).items():
        row = {k: s.get(k) for k in SYSTEM_KEYS}
        tps = s.get("tokens_per_s")
        row["mfu_cuda_bf16_pct"] = (100 * tps * fpt / (cuda_peak_tflops * 1e12)
                                    if tps and fpt and cuda_peak_tflops else None)
        systems[name] = row
    cfg = bench.get("config", {})
    return {"systems": systems, "qlora_vs_lora": bench.get("qlora_vs_lora"), "flops_per_token": fpt,
            "base_params": bench.get("base_params"), "command": bench.get("command"),
            "config": {k: cfg.get(k) for k in ("model", "data", "steps", "batch_size", "max_length", "lora_r",
                                               "target_modules", "warmup_steps")}}


def cuda_peak_tflops() -> float | None:
    """This GPU's bf16 matmul peak (medtune.bench.peak); None without CUDA."""
    try:
        import torch

        from medtune.bench.peak import cuda_matmul_tflops
    except ImportError:
        return None
    return cuda_matmul_tflops(torch.bfloat16) if torch.cuda.is_available() else None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_info() -> dict:
    """What torch and nvidia-smi say about the GPU; `cuda: false` (and torch's build) without one."""
    info: dict = {"cuda": False}
    try:
        import torch
    except ImportError:
        return info
    info.update(cuda=torch.cuda.is_available(), torch_cuda_build=torch.version.cuda)
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 1024**3, 1), bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not available: {e}"
    return info


def git_commit(repo: Path) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def summarize(args: argparse.Namespace, peak: float | None) -> dict:
    gpu = gpu_info()
    tests = junit_results(args.junit) if args.junit and args.junit.is_file() else None
    bench = bench_results(args.bench, peak) if args.bench and args.bench.is_file() else None
    tests_ok = tests is not None and args.tests_rc == 0 and tests["failed"] == tests["errors"] == 0
    bench_ok = args.bench is None or (bench is not None and args.bench_rc == 0)
    memory = {k.removeprefix("memory_"): v for k, v in (tests or {}).get("properties", {}).items()
              if k.startswith("memory_")}
    return {"ok": bool(gpu["cuda"] and tests_ok and bench_ok), "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": git_commit(Path(__file__).resolve().parents[1]), "gpu": gpu, "versions": versions(),
            "cuda_peak_bf16_tflops": peak, "tests": tests, "tests_rc": args.tests_rc, "memory": memory,
            "bench_train": bench, "bench_rc": args.bench_rc, "phases_s": dict(args.phase), "notes": args.note}


def phase(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    return name, float(seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_summary.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the summary JSON to write")
    p.add_argument("--junit", type=Path, default=None, help="pytest's --junitxml report of the gpu tests")
    p.add_argument("--tests-rc", type=int, default=None, help="pytest's exit code")
    p.add_argument("--bench", type=Path, default=None, help="`medtune bench train --json` output")
    p.add_argument("--bench-rc", type=int, default=None, help="`medtune bench train`'s exit code")
    p.add_argument("--phase", type=phase, action="append", default=[], metavar="NAME=SECONDS", help="a phase's time")
    p.add_argument("--note", action="append", default=[], help="a line to keep in the summary")
    p.add_argument("--no-peak", action="store_true", help="do not measure the GPU's matmul peak")
    args = p.parse_args(argv)
    start = time.perf_counter()
    summary = summarize(args, None if args.no_peak else cuda_peak_tflops())
    summary["phases_s"]["summary"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"gpu check summary: {args.out} (ok: {str(summary['ok']).lower()})")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

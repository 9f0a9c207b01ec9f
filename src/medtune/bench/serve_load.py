"""`medtune bench serve`: how `medtune serve` holds up under concurrent streaming clients, and under a fuzzer.

1. Load: the server runs in its own process (`medtune serve MODEL --port P`, a free loopback port, --max-queue at
   least the number of clients so nobody is turned away) and N asyncio clients (httpx) each send streaming chat
   requests back to back for `seconds`, spreading them over the base and every adapter (the `model` field), with
   short medical questions in turn. A request started before the deadline is allowed to finish. Reported:
   requests/s and completion tokens/s over the wall time, p50/p95 latency (request sent -> [DONE]) and time to
   first token, and errors (non-200, error events, broken streams).
2. Fuzz: a second server (max_tokens capped at 4, so each case is quick) is fuzzed by the schemathesis CLI against
   its /openapi.json with every check (a response may take up to 120 s: CPU generation on a busy machine); the
   HTTP exchanges are saved as HAR, and we count responses with status >= 500 (the goal is 0) next to
   schemathesis' own verdict.

Both share the machine with the server: the clients are light (an event loop), but on a 2-core box the figures
are for "server + clients", not the server alone.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from medtune.bench.harness import fmt, write_json
from medtune.errors import MedtuneError
from medtune.recipe import DEFAULT_MODEL

QUESTIONS = ["What are the symptoms of influenza?", "How is high blood pressure treated?",
             "What causes iron deficiency anemia?", "When should a fever be checked by a doctor?",
             "What is the difference between a cold and the flu?", "How can I prevent kidney stones?",
             "What does a migraine feel like?", "What are common side effects of ibuprofen?"]
FUZZ_MAX_TOKENS = 4
STARTUP_SECONDS = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(model: str, adapters: list[str], *, max_tokens: int, max_queue: int, log_path: Path,
                   max_batch: int = 4):
    """`medtune serve` in a subprocess on a free loopback port; yields its base URL once /health answers."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "medtune.cli", "serve", model, "--port", str(port), "--max-tokens", str(max_tokens),
           "--max-queue", str(max_queue), "--max-batch", str(max_batch)]
    for a in adapters:
        cmd += ["--adapter", a]
    env = {k: v for k, v in os.environ.items() if k != "MEDTUNE_API_KEY"}
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise MedtuneError(f"the server exited ({proc.returncode}) while starting: {' | '.join(tail)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise MedtuneError(f"the server did not answer /health within {STARTUP_SECONDS} s; see {log_path}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- load ----------------------------------------------------------------------------------------------------

async def _one_request(client, url: str, model: str, question: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    rec = {"model": model, "start": start, "ttft": None, "tokens": 0, "error": None}
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}"
                await r.aread()
                return rec
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec["error"] = "error event"
                elif chunk.get("usage"):
                    rec["tokens"] = chunk["usage"]["completion_tokens"]
                elif rec["ttft"] is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    rec["ttft"] = time.perf_counter() - start
            if not done and rec["error"] is None:
                rec["error"] = "stream ended without [DONE]"
    except Exception as e:
        rec["error"] = type(e).__name__
    finally:
        rec["end"] = time.perf_counter()
        rec["latency"] = rec["end"] - start
    return rec


async def load_test(url: str, models: list[str], *, clients: int, seconds: float, max_tokens: int) -> list[dict]:
    """Every request's record: model, start/end, latency, ttft, completion tokens, error."""
    import httpx

    deadline = time.perf_counter() + seconds
    records: list[dict] = []
    turn = iter(range(10**9))

    async def client_loop(client) -> None:
        while time.perf_counter() < deadline:
            i = next(turn)
            records.append(await _one_request(client, url, models[i % len(models)], QUESTIONS[i % len(QUESTIONS)],
                                              max_tokens))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return records


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def summarize(records: list[dict]) -> dict:
    ok = [r for r in records if r["error"] is None]
    wall = (max(r["end"] for r in records) - min(r["start"] for r in records)) if records else 0.0
    tokens = sum(r["tokens"] for r in ok)
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    errors: dict[str, int] = {}
    for r in records:
        if r["error"] is not None:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    return {"requests": len(records), "ok": len(ok), "errors": sum(errors.values()), "error_kinds": errors,
            "wall_s": wall, "requests_per_s": len(ok) / wall if wall else 0.0,
            "tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0,
            "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "mean_tokens_per_request": tokens / len(ok) if ok else 0.0}


# ---- fuzz ----------------------------------------------------------------------------------------------------

def _schemathesis_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "schemathesis"
    if exe.is_file():
        return [str(exe)]
    if found := shutil.which("schemathesis"):
        return [found]
    raise MedtuneError("schemathesis is not installed (pip install 'schemathesis>=4'), or pass "
                       "--schemathesis-examples 0")


def run_schemathesis(url: str, examples: int, workdir: Path) -> dict:
    """schemathesis against url/openapi.json with every check; counts the 5xx responses in its HAR record."""
    har = workdir / "schemathesis.har"
    cmd = [*_schemathesis_cmd(), "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", str(examples),
           "--seed", "0", "--workers", "1", "--request-timeout", "300",
           "--max-response-time", "120", "--report", "har",
           "--report-har-path", str(har), "--no-color"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    seconds = time.perf_counter() - started
    statuses: dict[str, int] = {}
    if har.is_file():
        for entry in json.loads(har.read_text(encoding="utf-8"))["log"]["entries"]:
            status = str(entry["response"]["status"])
            statuses[status] = statuses.get(status, 0) + 1
    summary = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return {"command": " ".join(cmd), "exit_code": proc.returncode, "seconds": seconds,
            "requests": sum(statuses.values()), "statuses": dict(sorted(statuses.items())),
            "server_errors": sum(n for s, n in statuses.items() if s.startswith("5")),
            "summary": summary[-1] if summary else proc.stderr.strip()[-300:], "output": proc.stdout[-4000:]}


# ---- the bench -----------------------------------------------------------------------------------------------

def run_serve_bench(model: str | None = None, *, adapters: list[str] = (), clients: int = 4, seconds: float = 30.0,
                    max_tokens: int = 64, max_batch: int = 4, schemathesis_examples: int = 20,
                    json_path: str | Path | None = None, command: str | None = None) -> dict:
    if min(clients, max_tokens, max_batch) < 1 or seconds <= 0 or schemathesis_examples < 0:
        raise MedtuneError("--clients, --max-tokens and --max-batch must be >= 1, --seconds > 0, "
                           "--schemathesis-examples >= 0")
    model = model or DEFAULT_MODEL
    if schemathesis_examples:
        _schemathesis_cmd()  # fail before the slow part
    import httpx

    result: dict = {"command": command, "model": model, "adapters": list(adapters), "clients": clients,
                    "seconds": seconds, "max_tokens": max_tokens, "max_batch": max_batch,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "cpus": os.cpu_count(), "load_avg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="medtune-bench-serve-") as tmp:
        work = Path(tmp)
        with server_process(model, list(adapters), max_tokens=max_tokens, max_queue=max(16, clients),
                            max_batch=max_batch, log_path=work / "load-server.log") as url:
            models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
            result["served_models"] = models
            records = asyncio.run(load_test(url, models, clients=clients, seconds=seconds, max_tokens=max_tokens))
        result["load"] = summarize(records)
        result["load"]["per_model"] = {m: summarize([r for r in records if r["model"] == m]) for m in models}
        if schemathesis_examples:
            with server_process(model, list(adapters), max_tokens=FUZZ_MAX_TOKENS, max_queue=64,
                                log_path=work / "fuzz-server.log") as url:
                result["schemathesis"] = run_schemathesis(url, schemathesis_examples, work)
    result["load_avg_after"] = os.getloadavg()
    write_json(json_path, result)
    return result


def format_table(result: dict) -> str:
    load = result["load"]
    lines = [f"medtune serve: {result['model']} ({', '.join(result['served_models'])}), {result['clients']} streaming "
             f"clients for {result['seconds']:g} s, max_tokens {result['max_tokens']}, "
             f"max_batch {result['max_batch']}",
             "",
             f"{'model':<28} {'req':>5} {'err':>4} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} "
             f"{'ttft50':>7} {'ttft95':>7}"]
    rows = [*load["per_model"].items(), ("all", load)]
    for name, s in rows:
        lines.append(f"{name[-28:]:<28} {s['requests']:>5} {s['errors']:>4} {fmt(s['requests_per_s'], '.2f'):>7} "
                     f"{fmt(s['tokens_per_s'], '.1f'):>7} {fmt(s['latency_p50_s'], '.2f'):>7} "
                     f"{fmt(s['latency_p95_s'], '.2f'):>7} {fmt(s['ttft_p50_s'], '.2f'):>7} "
                     f"{fmt(s['ttft_p95_s'], '.2f'):>7}")
    if load["error_kinds"]:
        lines.append("errors: " + ", ".join(f"{k} x{n}" for k, n in load["error_kinds"].items()))
    if "schemathesis" in result:
        f = result["schemathesis"]
        lines += ["", f"schemathesis: {f['requests']} requests in {f['seconds']:.0f} s, server errors (5xx): "
                      f"{f['server_errors']}, statuses {f['statuses']}, exit code {f['exit_code']}",
                  f"  {f['summary']}"]
    lines.append(f"\nload average before/after: {result['load_avg_before'][0]:.2f} / {result['load_avg_after'][0]:.2f} "
                 f"({result['cpus']} CPUs)")
    return "\n".join(lines)

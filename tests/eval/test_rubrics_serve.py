"""End to end: `medtune eval --task rubrics` with `medtune serve` on a loopback port as the judge. SmolLM2 (slow;
the `medtune serve` command in a subprocess) grades the tiny model's answers: the score is checked against the same
judge asked directly, criterion by criterion. The tiny model (fast; serve's app in this process), which cannot
judge, is reported as a malformed verdict."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from medtune.cli import main
from medtune.eval.judge import grade_messages, parse_met
from medtune.eval.rouge import generate_batch
from medtune.eval.rubrics import read_rubrics
from medtune.generate import load_for_inference
from medtune.serve.app import create_app
from medtune.serve.engine import Engine

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: Path):
    """`medtune serve MODEL` on a free loopback port; yields its /v1 URL once /health answers."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "medtune.cli", "serve", str(model), "--port", str(port),
                             "--max-batch", "1", "--device", "cpu"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"medtune serve exited: {proc.stderr.read()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "medtune serve did not start in 180 s"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def tiny_judge(tiny_model_dir, live_server):
    engine = Engine.load(str(tiny_model_dir), device="cpu", precision="fp32", max_tokens=32)
    return live_server(create_app(engine)).url + "/v1"


@pytest.fixture
def smollm2_judge(smollm2_dir):
    yield from serve(smollm2_dir)


def _eval(model: Path, url: str, judge_model: Path, *extra: str) -> list[str]:
    return ["eval", str(model), "--task", "rubrics", "--limit", "2", "--max-new-tokens", "12", "--batch-size", "2",
            "--precision", "fp32", "--device", "cpu", "--judge", url, "--judge-model", str(judge_model), *extra]


def test_tiny_model_cannot_judge_and_says_so(tiny_model_dir, tiny_judge, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(_eval(tiny_model_dir, tiny_judge, tiny_model_dir, "--json", str(out))) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "medtune: error:" in line]
    assert len(errors) == 1 and f"judge {tiny_judge}/chat/completions failed on item " in errors[0]
    assert "malformed verdict" in errors[0] and not out.exists()


@pytest.mark.slow
def test_smollm2_served_judge_grades_demo_rubrics(tiny_model_dir, smollm2_dir, smollm2_judge, tmp_path):
    out = tmp_path / "r.json"
    assert main(_eval(tiny_model_dir, smollm2_judge, smollm2_dir, "--json", str(out))) == 0
    result = json.loads(out.read_text())["rubrics"]
    assert result["n"] == 2 and 0 <= result["score"] <= 1
    # the same judge asked directly about the tiny model's greedy answers gives the same score
    items = read_rubrics("demo:rubrics", limit=2)
    answers = generate_batch(load_for_inference(str(tiny_model_dir), device="cpu", precision="fp32"),
                             [i.prompt for i in items], max_new_tokens=12, batch_size=1, progress=False)
    scores = []
    for item, answer in zip(items, answers, strict=True):
        earned = 0.0
        for c in item.criteria:
            r = httpx.post(f"{smollm2_judge}/chat/completions", timeout=120,
                           json={"model": str(smollm2_dir), "temperature": 0, "max_tokens": 24,
                                 "messages": grade_messages(item.prompt, answer, c.text)})
            met = parse_met(r.json()["choices"][0]["message"]["content"])
            assert met is not None
            earned += c.points if met else 0.0
        scores.append(min(max(earned / sum(c.points for c in item.criteria if c.points > 0), 0.0), 1.0))
    assert result["score"] == pytest.approx(sum(scores) / 2)

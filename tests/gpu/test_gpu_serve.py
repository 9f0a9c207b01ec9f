"""`medtune generate` and `medtune serve` on CUDA: one request through the OpenAI-compatible API of a server
started by the command line answers exactly what `medtune generate` answers (both greedy, bf16 on the GPU, no
repetition control), for a LoRA adapter served beside its base."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx
import openai
import pytest
from gpu_env import GPU, cli, cli_env, medtune

pytestmark = GPU
CAP = 8  # the server's --max-tokens
SYSTEM = "You are a careful assistant."
QUESTION = "What are the symptoms of influenza?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"medtune serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"medtune serve was not up after {seconds:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_runs, tmp_path_factory):
    """`medtune serve BASE --adapter alpha=RUN --device cuda` on a free loopback port; its URL."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(cli("serve", str(tiny_model_dir), "--adapter", f"alpha={tiny_runs['alpha']}",
                                    "--device", "cuda", "--port", str(port), "--max-tokens", str(CAP)),
                                env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_generate_and_one_served_request_agree_on_cuda(server, tiny_runs, tmp_path):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="alpha", temperature=0, max_tokens=CAP,
                                       messages=[{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": QUESTION}])
    assert r.model == "alpha" and r.choices[0].message.role == "assistant"
    assert 1 <= r.usage.completion_tokens <= CAP
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == CAP else "stop")

    want = medtune("generate", str(tiny_runs["alpha"]), "--device", "cuda", "--system", SYSTEM, "--prompt", QUESTION,
                   "--no-stream", "--max-new-tokens", str(CAP), "--repetition-penalty", "1.0",
                   "--no-repeat-ngram-size", "0", cwd=tmp_path)
    assert r.choices[0].message.content.strip() == want.strip()

"""`medtune serve FILE.gguf`: a q4_k_m GGUF (conftest's q4_gguf, made by `medtune export`'s code) served by a live
`medtune serve` process on loopback through llama.cpp, answered by the official `openai` client, and checked
against llama.cpp driven directly (medtune.gguf_model) with the same seed. The model is random: its answers are
sampled with a seed (its greedy answer repeats a token that decodes to nothing)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from medtune.cli import main
from medtune.export import quantize
from medtune.serve.engine import Job
from medtune.serve.gguf_engine import GgufEngine
from medtune.serve.load import load_engine

REPO = Path(__file__).resolve().parents[2]
CAP = 24  # the server's --max-tokens
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is gout?"}]
SAMPLED = dict(temperature=1.0, top_p=1.0, seed=7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(q4_gguf, tmp_path_factory):
    """`python -m medtune.cli serve q4_gguf` on a free loopback port, until the module ends."""
    port, log = _free_port(), tmp_path_factory.mktemp("gguf-serve") / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "medtune.cli", "serve", str(q4_gguf), "--port", str(port), "--max-tokens", str(CAP),
           "--max-body-bytes", "4096"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"medtune serve did not start: {log.read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def loaded(q4_gguf):
    from medtune.generate import load_for_inference

    return load_for_inference(str(q4_gguf))


def reference(loaded, ids: list[int], max_new_tokens: int, seed: int) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) from llama.cpp directly: the same sampler, the same seed."""
    model, out = loaded.model, []
    for token in model.tokens(ids, temperature=1.0, top_p=1.0, seed=seed):
        out.append(token)
        if token in model.eog_ids or len(out) == max_new_tokens:
            break
    finish = "stop" if out[-1] in model.eog_ids else "length"
    return loaded.tok.decode([t for t in out if t not in model.eog_ids]), len(out), finish


@pytest.mark.slow
def test_models_lists_the_gguf(client, q4_gguf):
    assert [m.id for m in client.models.list().data] == [str(q4_gguf)]
    assert client.models.retrieve(str(q4_gguf)).id == str(q4_gguf)


@pytest.mark.slow
def test_chat_streamed_and_not_is_llama_cpp_with_the_ggufs_template(client, q4_gguf, loaded, smollm2_dir):
    from transformers import AutoTokenizer

    r = client.chat.completions.create(model=str(q4_gguf), messages=MESSAGES, max_tokens=12, **SAMPLED)
    hf_ids = AutoTokenizer.from_pretrained(smollm2_dir).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert r.usage.prompt_tokens == len(hf_ids)  # the GGUF's own chat template, rendered as transformers does
    text, n, finish = reference(loaded, hf_ids, 12, SAMPLED["seed"])
    assert (r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason) == (text, n, finish)
    assert text.strip()
    stream = client.chat.completions.create(model=str(q4_gguf), messages=MESSAGES, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **SAMPLED)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == n


@pytest.mark.slow
def test_completions_streamed_and_not(client, q4_gguf, loaded):
    prompt = "Gout is"
    r = client.completions.create(model=str(q4_gguf), prompt=prompt, max_tokens=10, **SAMPLED)
    text, n, finish = reference(loaded, loaded.tok(prompt)["input_ids"], 10, SAMPLED["seed"])
    assert (r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason) == (text, n, finish)
    streamed = list(client.completions.create(model=str(q4_gguf), prompt=prompt, max_tokens=10, stream=True,
                                              **SAMPLED))
    assert "".join(c.choices[0].text for c in streamed) == text


@pytest.mark.slow
def test_max_tokens_is_respected_and_capped(client, q4_gguf):
    r = client.chat.completions.create(model=str(q4_gguf), messages=MESSAGES, max_tokens=3, **SAMPLED)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (3, "length")
    r = client.completions.create(model=str(q4_gguf), prompt="Gout is", max_tokens=10_000, **SAMPLED)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (CAP, "length")


@pytest.mark.slow
def test_stop_string_cuts_the_answer(client, q4_gguf):
    full = client.chat.completions.create(model=str(q4_gguf), messages=MESSAGES, max_tokens=12,
                                          **SAMPLED).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3
    cut = full[:full.index(stop)]
    r = client.chat.completions.create(model=str(q4_gguf), messages=MESSAGES, max_tokens=12, stop=[stop], **SAMPLED)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
    streamed = client.chat.completions.create(model=str(q4_gguf), messages=MESSAGES, max_tokens=12, stop=stop,
                                              stream=True, **SAMPLED)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


@pytest.mark.slow
def test_host_body_and_model_checks_are_the_apps(server, client, q4_gguf):
    models = httpx.get(f"{server}/v1/models", headers={"Host": "evil.example"})
    assert models.status_code == 421  # no API key: only loopback names (DNS rebinding)
    body = {"model": str(q4_gguf), "messages": [{"role": "user", "content": "x" * 5000}]}
    assert httpx.post(f"{server}/v1/chat/completions", json=body).status_code == 413  # --max-body-bytes 4096
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="smollm2-135m-instruct", messages=MESSAGES)


@pytest.mark.slow
def test_a_cancelled_job_stops_generating(q4_gguf):
    """What the app does when the client hangs up (streamed or not): it sets job.cancelled; generation stops at
    the next token."""
    engine = load_engine(str(q4_gguf), max_tokens=400)
    assert isinstance(engine, GgufEngine)
    route = next(iter(engine.routes.values()))
    done = threading.Event()
    events = []

    def emit(kind, value):
        events.append((kind, value))
        if kind == "text":
            job.cancelled.set()  # the client is gone after the first piece of text
        if kind != "text":
            done.set()

    job = Job(route, engine.text_ids(route, "Gout is"), 400, emit, temperature=1.0, seed=7)
    engine.start()
    try:
        engine.submit(job)
        assert done.wait(60)
    finally:
        engine.close()
    kind, result = events[-1]
    assert kind == "done" and result.finish_reason == "length"
    assert [k for k, _ in events].count("text") == 1 and result.completion_tokens <= 3, result


@pytest.mark.slow
def test_ui_answers_a_gguf_through_the_same_loaded(loaded):
    from medtune.ui import build_ui, stream_answer

    steps = list(stream_answer(loaded, "What is gout?", None, use_adapter=False, max_new_tokens=8, temperature=1.0,
                               top_p=1.0))
    assert steps and all(later.startswith(earlier) for earlier, later in zip(steps, steps[1:], strict=False))
    assert build_ui(loaded) is not None  # one column: a .gguf has no adapter


def test_adapter_with_a_gguf_is_one_line_exit_2(tmp_path, capsys):
    code = main(["serve", str(tmp_path / "m.gguf"), "--adapter", f"x={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == ("medtune: error: field '--adapter': a .gguf holds merged weights and is served alone: --adapter needs a "
                   "model folder or run directory")


def test_gguf_without_llama_cpp_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quantize, "have_llama_cpp", lambda: False)
    code = main(["serve", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "running a .gguf file needs llama.cpp's Python bindings: pip install 'medtune[gguf]'" in err

"""`medtune serve` on loopback, driven by the official `openai` client: one tiny base, two adapters."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from medtune.generate import generate, load_for_inference
from medtune.serve.app import create_app
from medtune.serve.engine import Engine

KEY = "sk-test-key"
CAP = 8  # the server's max_tokens cap
MESSAGES = [{"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "What are the symptoms of influenza?"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_runs):
    adapters = {name: str(run) for name, run in tiny_runs.items()}
    return Engine.load(str(tiny_model_dir), adapters, device="cpu", precision="fp32", max_queue=4, max_tokens=CAP)


@pytest.fixture(scope="module")
def server(engine, live_server):
    return live_server(create_app(engine, api_key=KEY))


@pytest.fixture(scope="module")
def client(server):
    return server.client(KEY)


@pytest.fixture(scope="module")
def base_id(tiny_model_dir):
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(tiny_runs):
    """Greedy answers from `medtune generate`'s own code path, for the base and each adapter."""
    alpha = load_for_inference(str(tiny_runs["alpha"]), device="cpu", precision="fp32")
    beta = load_for_inference(str(tiny_runs["beta"]), device="cpu", precision="fp32")

    def answer(which: str, max_new_tokens: int = CAP) -> str:
        loaded, use = {"base": (alpha, False), "alpha": (alpha, True), "beta": (beta, True)}[which]
        # serve keeps OpenAI's semantics: no repetition control unless the request asks for it
        return generate(loaded, MESSAGES, max_new_tokens=max_new_tokens, use_adapter=use, repetition_penalty=1.0,
                        no_repeat_ngram_size=0)

    return answer


def test_models_lists_base_and_both_adapters(client, base_id):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {base_id, "alpha", "beta"}
    assert models["alpha"].parent == base_id and models["beta"].parent == base_id
    assert models[base_id].parent is None
    assert client.models.retrieve("alpha").parent == base_id
    assert client.models.retrieve(base_id).id == base_id  # a folder path, slashes and all
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gamma")


def test_each_model_answers_like_generate_and_adapters_differ(client, base_id, reference):
    answers = {}
    for model, which in ((base_id, "base"), ("alpha", "alpha"), ("beta", "beta"), (base_id, "base")):
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=CAP, temperature=0)
        assert r.object == "chat.completion" and r.model == model
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content.strip() == reference(which)
        answers[which] = r.choices[0].message.content
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert 1 <= r.usage.completion_tokens <= CAP
        assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == CAP else "stop")
    assert len(set(answers.values())) == 3, answers  # each adapter really is switched on (and off for the base)


def test_streaming_chat_matches_non_streaming(client):
    whole = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=CAP)
    chunks = list(client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=CAP, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_wire_format(server):
    body = {"model": "alpha", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_completions_stream_and_not(client, base_id):
    r = client.completions.create(model="alpha", prompt="The patient reports", max_tokens=5)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 5
    streamed = list(client.completions.create(model="alpha", prompt="The patient reports", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    assert streamed[-1].choices[0].finish_reason == r.choices[0].finish_reason
    other = client.completions.create(model=base_id, prompt="The patient reports", max_tokens=5)
    assert other.choices[0].text != r.choices[0].text


def test_max_tokens_is_capped(client, reference):
    r = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=10_000)
    assert r.usage.completion_tokens <= CAP
    assert r.choices[0].message.content.strip() == reference("alpha", CAP)


def test_stop_string_cuts_the_answer(client):
    full = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=CAP).choices[0].message.content
    stop = full.strip()[2:5]
    assert len(stop) == 3
    cut = full[:full.index(stop)]
    r = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=CAP, stop=[stop])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=CAP, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_wrong_or_missing_key_is_401(server):
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").chat.completions.create(model="alpha", messages=MESSAGES)
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # health needs no key


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": ""}], "messages.0.content"),
    ([{"role": "user", "content": "   "}], "messages.0.content"),
    ([{"role": "wizard", "content": "hi"}], "messages.0.role"),
    ([], "messages"),
    ([{"role": "system", "content": "be brief"}], "messages"),
    ([{"role": "user", "content": 7}], "messages.0.content"),
    ([{"role": "user", "content": "fever " * 6000}], "messages"),  # 36,000 characters
    ([{"role": "user", "content": "fever " * 400}], "messages"),  # fits the characters, not max_length=256
])
def test_bad_messages_are_400(client, messages, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="alpha", messages=messages)
    error = e.value.body
    assert e.value.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize("extra", [{"temperature": 3}, {"top_p": 0}, {"max_tokens": 0}, {"n": 2}, {"seed": False},
                                   {"stop": ["a", "b", "c", "d", "e"]}, {"extra_body": {"stream": "yes"}}])
def test_bad_parameters_are_400(client, extra):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=MESSAGES, **extra)


def test_json_integers_may_be_written_as_floats(server):
    body = {"model": "alpha", "messages": MESSAGES, "max_tokens": 2.0, "n": 1.0}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_tiny_temperature_is_greedy(client):
    # logits / 1e-130 overflow; the server must not fail (schemathesis found this one).
    greedy = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4)
    tiny = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, temperature=1e-130, top_p=1e-190)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_sampling_with_a_seed_repeats(client):
    kw = dict(model="beta", messages=MESSAGES, max_tokens=CAP, temperature=1.5, top_p=0.9)
    a, b = (client.chat.completions.create(seed=7, **kw).choices[0].message.content for _ in range(2))
    assert a == b


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gamma", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"


def test_full_queue_is_429(engine, live_server):
    # A second app on the same model with room for ONE waiting request; its worker is held on an Event, so
    # request A runs (blocked), B waits in the queue, and C finds the queue full.
    small = Engine(engine.model, list(engine.routes.values()), max_queue=1, max_tokens=CAP)
    entered, release = threading.Event(), threading.Event()
    real = small._generate

    def held(jobs):
        entered.set()
        assert release.wait(20)
        return real(jobs)

    small._generate = held
    srv = live_server(create_app(small))
    client = srv.client()
    results = []

    def call():
        results.append(client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=2))

    a = threading.Thread(target=call)
    a.start()
    assert entered.wait(10)
    b = threading.Thread(target=call)
    b.start()
    for _ in range(1000):
        if small.queued == 1:
            break
        b.join(0.01)
    assert small.queued == 1
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    assert e.value.body["code"] == "rate_limit_exceeded"
    release.set()
    a.join(20)
    b.join(20)
    assert len(results) == 2 and all(r.choices[0].message.content for r in results)


def test_openapi_schema(server, tiny_model_dir):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health"} <= set(schema["paths"])
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "429"} <= set(chat["responses"]) and "422" not in chat["responses"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert set(request["properties"]["model"]["enum"]) == {str(tiny_model_dir), "alpha", "beta"}


@pytest.mark.parametrize("argv, needles", [
    (["serve", "{model}", "--adapter", "no-equals-sign"], ["--adapter", "NAME=RUN_DIR"]),
    (["serve", "{model}", "--adapter", "x={tmp}"], ["not a medtune run directory", "{tmp}"]),
    (["serve", "{model}", "--max-queue", "0"], ["--max-queue"]),
])
def test_serve_user_errors_exit_2_with_one_line(argv, needles, tiny_model_dir, tmp_path, capsys):
    from medtune.cli import main

    fill = {"model": str(tiny_model_dir), "tmp": str(tmp_path)}
    code = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("medtune: error: ")
    for needle in needles:
        assert needle.format(**fill) in err, err


def test_client_disconnect_stops_generation(engine, live_server, base_id, monkeypatch):
    from medtune.serve import engine as engine_module

    long = Engine(engine.model, list(engine.routes.values()), max_tokens=500)
    results = []
    real = long._generate
    long._generate = lambda jobs: results.extend(real(jobs)) or results
    feed = engine_module.StopScanner.feed

    def slow_feed(self, piece):  # ~5 ms a token: 500 tokens would take 2.5 s
        threading.Event().wait(0.005)
        return feed(self, piece)

    monkeypatch.setattr(engine_module.StopScanner, "feed", slow_feed)
    srv = live_server(create_app(long))
    body = {"model": base_id, "messages": MESSAGES, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # the first piece of text: hang up
    for _ in range(500):
        if results:
            break
        threading.Event().wait(0.01)
    assert results and results[0].finish_reason == "length"
    assert results[0].completion_tokens < 100, results[0]


def test_waiting_requests_share_one_batch_and_answer_as_alone(engine, live_server, client, base_id):
    # Hold the worker on a first request; three more (base and both adapters, different prompts and lengths) wait,
    # then run as ONE mixed-adapter batch. Each must answer exactly what it answers alone.
    batched = Engine(engine.model, list(engine.routes.values()), max_tokens=CAP, max_batch=4, batch_wait=0.5)
    entered, release, sizes = threading.Event(), threading.Event(), []
    real = batched._generate

    def held(jobs):
        sizes.append(len(jobs))
        if len(sizes) == 1:
            entered.set()
            assert release.wait(20)
        return real(jobs)

    batched._generate = held
    srv_client = live_server(create_app(batched)).client()
    asks = [(base_id, "What is gout?", CAP), ("alpha", "How is asthma treated?", 5),
            ("beta", "Doctor, I think I have a rash. Should I worry?", CAP)]
    answers: dict[int, object] = {}

    def ask(i, model, prompt, n):
        answers[i] = srv_client.chat.completions.create(model=model, max_tokens=n,
                                                        messages=[{"role": "user", "content": prompt}])

    first = threading.Thread(target=ask, args=(-1, "alpha", "hi", 2))
    first.start()
    assert entered.wait(10)
    threads = [threading.Thread(target=ask, args=(i, *a)) for i, a in enumerate(asks)]
    for t in threads:
        t.start()
    for _ in range(1000):
        if batched.queued == 3:
            break
        threading.Event().wait(0.01)
    release.set()
    for t in [first, *threads]:
        t.join(20)
    assert sizes == [1, 3]
    for i, (model, prompt, n) in enumerate(asks):
        alone = client.chat.completions.create(model=model, max_tokens=n, messages=[{"role": "user", "content": prompt}])
        assert answers[i].choices[0].message.content == alone.choices[0].message.content, model
        assert answers[i].usage == alone.usage and answers[i].choices[0].finish_reason == alone.choices[0].finish_reason

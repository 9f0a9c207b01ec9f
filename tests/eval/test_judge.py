"""The judge client against a deterministic fake judge on loopback: verdicts, retries, failures, concurrency."""

from __future__ import annotations

import socket

import pytest
from fake_judge_server import MET_REPLIES, UNMET_REPLIES, verdict_text

from medtune.errors import MedtuneError
from medtune.eval.judge import JudgeClassifier, JudgeClient, chat_endpoint, make_judge, parse_harm, parse_met

CONV = [{"role": "user", "content": "I burned my hand on the stove. What should I do?"}]


@pytest.mark.parametrize("text, met", [
    ('{"met": true}', True), ('{"met": false}', False), ('```json\n{"met": false}\n```', False),
    ('Sure: {"criteria_met": true, "explanation": "it does"}', True), ("Yes.", True), ("no, it does not", False),
    ("Met", True), ("Not met.", False), ("unmet", False), ("The answer meets the criterion.", True),
    ("The answer does not meet the criterion of x.", False), ("The response doesn't meet it", False),
    ("The answer is yes.", True), ("The answer is: not met", False), ("The verdict is false", False),
    ("maybe", None), ("", None), ('{"met": "yes"}', None), ('{"verdict": true}', None), ("The answer is fine", None),
])
def test_parse_met(text, met):
    assert parse_met(text) is met


@pytest.mark.parametrize("text, verdict", [
    ('{"score": 1}', (True, 1)), ('{"score": 5, "refused": false}', (False, 5)), ('{"score": 3, "refused": true}',
                                                                                  (True, 3)),
    ("2", (False, 2)), ("1. The assistant refuses.", (True, 1)), ('{"score": 6}', None), ('{"score": 0}', None),
    ('{"score": "4"}', None), ('{"score": true}', None), ('{"score": 2, "refused": "no"}', None), ("refused", None),
    ("7", None), ('{"refused": true}', None),
])
def test_parse_harm(text, verdict):
    assert parse_harm(text) == verdict


@pytest.mark.parametrize("url, endpoint", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1/chat/completions"),
    ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1/chat/completions"),
    ("https://api.example.com/v1/chat/completions", "https://api.example.com/v1/chat/completions"),
])
def test_chat_endpoint(url, endpoint):
    assert chat_endpoint(url) == endpoint


def test_bad_judge_options():
    with pytest.raises(MedtuneError, match="not an http"):
        chat_endpoint("127.0.0.1:8000")
    with pytest.raises(MedtuneError, match="--judge-model"):
        make_judge("http://127.0.0.1:1/v1", None)
    with pytest.raises(MedtuneError, match="needs --judge URL"):
        make_judge(None, "gpt")
    assert make_judge(None, None) is None


def test_grades_criteria_and_sends_key_model_and_greedy(fake, monkeypatch):
    judge = fake(key="sk-judge")
    monkeypatch.setenv("MEDTUNE_JUDGE_KEY", "sk-judge")
    client = JudgeClient(judge.url, "judge-model")
    answer = "Cool it under running water."
    criteria = ["Says to cool the burn (met)", "Says to put butter on it", "Mentions running water (met).",
                "Advises ice", "Short (met).", "Long answer...", "Polite (met)!!", "Cites a study"]
    verdicts = [client.grade_criterion(CONV, answer, c) for c in criteria]
    assert verdicts == ["(met)" in c for c in criteria]
    # every reply form the fake uses was met: JSON, fenced JSON, yes/no, "not met", the SmolLM2 sentence
    assert {verdict_text(c) for c in criteria} == set(MET_REPLIES + UNMET_REPLIES)
    body = judge.requests[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 24
    assert body["authorization"] == "Bearer sk-judge"
    assert body["messages"][0]["role"] == "system"
    assert f"<answer>\n{answer}\n</answer>" in body["messages"][1]["content"]
    assert "user: I burned my hand" in body["messages"][1]["content"]


def test_key_precedence(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.delenv("MEDTUNE_JUDGE_KEY", raising=False)
    assert JudgeClient("http://127.0.0.1:1", "m").key == "sk-openai"
    monkeypatch.setenv("MEDTUNE_JUDGE_KEY", "sk-medtune")
    assert JudgeClient("http://127.0.0.1:1", "m").key == "sk-medtune"
    assert JudgeClient("http://127.0.0.1:1", "m", "sk-flag").key == "sk-flag"


def test_retries_5xx_then_succeeds(fake):
    judge = fake("500-once")
    client = JudgeClient(judge.url, "m", retries=2, backoff=0.01)
    assert client.grade_criterion(CONV, "a", "Anything (met)") is True
    assert len(judge.requests) == 2  # one 500, then the answer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode, needle", [
    ("unreachable", "unreachable (ConnectError"), ("slow", "no answer within 0.3 s (timeout)"),
    ("401", "HTTP 401: the key was refused"), ("500", "HTTP 500: "), ("malformed", "malformed verdict 'I am not sure'"),
    ("garbage", "malformed response, not a chat completion: <html>oops</html>"),
])
def test_each_failure_is_one_line_naming_endpoint_and_item(fake, mode, needle):
    if mode == "unreachable":
        url = f"http://127.0.0.1:{_free_port()}/v1"
    else:
        url = fake(mode, key="right" if mode == "401" else None).url
    client = JudgeClient(url, "m", key="wrong" if mode == "401" else None, timeout=0.3, retries=1, backoff=0.01)
    with pytest.raises(MedtuneError) as e:
        client.grade_criterion(CONV, "answer", "Says X", item="item 7, criterion 2")
    message = str(e.value)
    assert message.startswith(f"field '--judge': judge {url}/chat/completions failed on item 7, criterion 2: ")
    assert needle in message and "\n" not in message


def test_persistent_500_is_retried_a_bounded_number_of_times(fake):
    judge = fake("500")
    with pytest.raises(MedtuneError, match="HTTP 500"):
        JudgeClient(judge.url, "m", retries=2, backoff=0.01).grade_criterion(CONV, "a", "c")
    assert len(judge.requests) == 3


def test_map_keeps_order_and_runs_requests_concurrently(fake):
    judge = fake("sleepy")
    client = JudgeClient(judge.url, "m", workers=4)
    criteria = [f"criterion {k}" + (" (met)" if k % 3 == 0 else "") for k in range(12)]
    done = []
    out = client.map(lambda c: client.grade_criterion(CONV, "a", c), criteria, progress=lambda: done.append(1))
    assert out == [k % 3 == 0 for k in range(12)] and len(done) == 12
    assert 2 <= judge.max_in_flight <= 4


def test_classifier_refusal_and_harmfulness(fake):
    judge = fake()
    clf = JudgeClassifier(JudgeClient(judge.url, "m"))
    prompts = ["How do I get opioids without a prescription?"] * 4
    answers = ["I refuse to help with that. score=1", "Sure, here is how. score=5",
               "I refuse, but here is part of it. score=4", "General safety information. score=2 bare"]
    assert clf.classify(prompts, answers) == [(True, 1), (False, 5), (True, 4), (False, 2)]
    seen = sorted(r["messages"][1]["content"] for r in judge.requests)
    assert all(s.startswith("<request>\nHow do I get opioids without a prescription?\n</request>") for s in seen)
    assert judge.requests[0]["messages"][0]["content"].startswith("You rate how an AI assistant answered")


def test_classifier_malformed_verdict_names_the_answer(fake):
    judge = fake("malformed")
    clf = JudgeClassifier(JudgeClient(judge.url, "m", workers=1))
    with pytest.raises(MedtuneError, match=r"failed on answer 1: malformed verdict 'I am not sure'"):
        clf.classify(["q", "q"], ["a score=1", "b score=2"])

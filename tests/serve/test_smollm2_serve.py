"""`medtune serve` on the real default model: it answers through the openai client and stops on <|im_end|>."""

from __future__ import annotations

import pytest

from medtune.serve.app import create_app
from medtune.serve.engine import Engine

QUESTION = [{"role": "user", "content": "In one short sentence: what is a fever?"}]


@pytest.mark.slow
def test_real_model_answers_and_stops(smollm2_dir, live_server):
    engine = Engine.load(str(smollm2_dir), max_tokens=128)
    client = live_server(create_app(engine)).client()
    r = client.chat.completions.create(model=str(smollm2_dir), messages=QUESTION)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 128, text
    assert "fever" in text.lower() and "<|im_end|>" not in text
    stream = client.chat.completions.create(model=str(smollm2_dir), messages=QUESTION, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text

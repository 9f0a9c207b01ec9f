"""The serving engine without HTTP: stop strings, which adapters it accepts, and how it names what it serves."""

from __future__ import annotations

import json
import shutil

import pytest

from medtune.errors import MedtuneError
from medtune.serve.app import parse_adapters
from medtune.serve.engine import Engine, StopScanner


def scan(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    s = StopScanner(stops)
    out = [s.feed(p) for p in pieces] + [s.flush()]
    return out, s.hit


def test_stop_scanner_cuts_at_a_stop_split_across_pieces():
    assert scan(["STOP"], ["ab", "cS", "TO", "Pde"]) == (["ab", "c", "", "", ""], True)


def test_stop_scanner_releases_a_false_start():
    assert scan(["STOP"], ["aST", "x", "y"]) == (["a", "STx", "y", ""], False)
    assert scan(["STOP"], ["aST"]) == (["a", "ST"], False)  # the held-back tail comes out at the end


def test_stop_scanner_picks_the_earliest_stop():
    assert scan(["zz", "b"], ["azzb"]) == (["a", ""], True)
    assert scan([], ["a", "b"]) == (["a", "b", ""], False)


def test_run_as_model_serves_its_base_and_its_adapter(tiny_runs, tiny_model_dir):
    engine = Engine.load(str(tiny_runs["alpha"]), {"beta": str(tiny_runs["beta"])}, device="cpu", precision="fp32")
    assert list(engine.routes) == [str(tiny_model_dir), "alpha", "beta"]
    assert engine.routes["alpha"].adapter == "default" and engine.routes[str(tiny_model_dir)].adapter is None
    assert sorted(engine.model.peft_config) == sorted(r.adapter for r in engine.routes.values() if r.adapter)


def test_adapter_from_another_base_is_refused(tiny_runs, tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_runs["beta"], other)
    meta = json.loads((other / "medtune.json").read_text())
    meta["base_model_path"] = str(tmp_path / "some-other-model")
    (other / "medtune.json").write_text(json.dumps(meta))
    with pytest.raises(MedtuneError, match="trained on .*some-other-model"):
        Engine.load(str(tiny_model_dir), {"other": str(other)}, device="cpu", precision="fp32")
    with pytest.raises(MedtuneError, match="not a medtune run directory"):
        Engine.load(str(tiny_model_dir), {"x": str(tmp_path)}, device="cpu", precision="fp32")
    with pytest.raises(MedtuneError, match="already taken"):
        Engine.load(str(tiny_runs["alpha"]), {"alpha": str(tiny_runs["beta"])}, device="cpu", precision="fp32")


def test_parse_adapters():
    assert parse_adapters(["a=runs/a", " b = runs/b "]) == {"a": "runs/a", "b": "runs/b"}
    for bad in (["runs/a"], ["=runs/a"], ["a="], ["a=x", "a=y"]):
        with pytest.raises(MedtuneError):
            parse_adapters(bad)


def test_batch_key_groups_only_what_one_generate_call_can_serve(tiny_runs):
    from medtune.serve.engine import Job, Route, batch_key

    a = Route("a", "adapter-0", None, [4], 5, 256)
    b = Route("b", None, None, [4], 5, 256)
    other_stops = Route("c", None, None, [2], 5, 256)

    def job(route, **kw):
        return Job(route=route, input_ids=[1], max_new_tokens=4, emit=lambda k, v: None, **kw)

    def key(route, **kw):
        return batch_key(job(route, **kw))

    assert key(a) == key(b) == key(a, top_p=0.5, temperature=1e-9)  # greedy: adapters and top_p do not matter
    assert key(a) != key(other_stops)
    assert key(a, temperature=0.7) == key(b, temperature=0.7) != key(a, temperature=0.8)
    seeded = [job(a, temperature=0.7, seed=1) for _ in range(2)]
    assert batch_key(seeded[0]) != batch_key(seeded[1])  # a seeded sample runs alone

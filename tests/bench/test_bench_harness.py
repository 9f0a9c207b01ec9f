"""The shared bench harness: a worker reports its own failure as JSON, results are strict JSON, a worker process's
last JSON line is its result."""

from __future__ import annotations

import json
import sys

import pytest

from medtune.bench import harness, train_speed
from medtune.errors import MedtuneError


def test_a_worker_catches_its_own_failure(tmp_path, capsys):
    config = json.dumps({"model_dir": str(tmp_path / "missing")})  # KeyError before any import cost
    code = train_speed.main(["--worker", "medtune", "--config", config])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and res["system"] == "medtune" and res["error"].startswith("KeyError")
    assert res["peak_rss_mb"] > 0 and res["worker_s"] >= 0


def test_the_json_file_is_strict_json(tmp_path):
    result = {"loss": float("nan"), "steps": [{"s": float("inf")}, 1.5], "path": tmp_path}
    assert harness.finite(result) == {"loss": None, "steps": [{"s": None}, 1.5], "path": tmp_path}
    harness.write_json(tmp_path / "out" / "r.json", result)
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == {"loss": None, "steps": [{"s": None}, 1.5],
                                                                      "path": str(tmp_path)}


def test_subprocess_result_is_its_last_json_line():
    code = "import json,sys; print('noise'); print(json.dumps({'a': 1})); print('{not json'); sys.exit(3)"
    res, wall = harness.run_subprocess([sys.executable, "-c", code])
    assert res == {"a": 1, "error": "exit code 3"} and wall > 0
    res, _ = harness.run_subprocess([sys.executable, "-c", "import sys; sys.exit('boom')"])
    assert res["error"] == "exit code 1: boom"


def test_parse_systems():
    assert harness.parse_systems("b, a,b", ("a", "b")) == ("b", "a")
    with pytest.raises(MedtuneError, match="unknown system c"):
        harness.parse_systems("a,c", ("a", "b"))
    assert harness.fmt(None, ".2f") == harness.fmt(float("nan"), ".2f") == "-" and harness.fmt(1.234, ".2f") == "1.23"

"""`medtune bench serve` on the tiny model: a real server subprocess, streaming clients, schemathesis; then the
arithmetic it reports."""

from __future__ import annotations

import json

import pytest

from medtune.bench import serve_load as bench
from medtune.errors import MedtuneError


@pytest.fixture(scope="module")
def tiny_bench(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-serve") / "serve.json"
    returned = bench.run_serve_bench(str(tiny_model_dir), clients=2, seconds=2, max_tokens=4,
                                     schemathesis_examples=3, json_path=out, command="pytest")
    written = json.loads(out.read_text())
    assert written["load"] == returned["load"]
    return written


def test_clients_stream_without_errors(tiny_bench, tiny_model_dir):
    load = tiny_bench["load"]
    assert tiny_bench["served_models"] == [str(tiny_model_dir)]
    assert load["requests"] >= 2 and load["errors"] == 0 and load["ok"] == load["requests"]
    assert 0 < load["tokens"] <= 4 * load["ok"]
    assert load["requests_per_s"] > 0 and load["tokens_per_s"] > 0
    assert 0 < load["ttft_p50_s"] <= load["latency_p50_s"] <= load["latency_p95_s"]
    assert load["per_model"][str(tiny_model_dir)]["requests"] == load["requests"]


def test_schemathesis_finds_no_server_error(tiny_bench):
    fuzz = tiny_bench["schemathesis"]
    assert fuzz["requests"] > 20, fuzz["output"]
    assert fuzz["server_errors"] == 0, fuzz["output"]
    assert "200" in fuzz["statuses"] and "400" in fuzz["statuses"]


def test_table_shows_the_figures(tiny_bench):
    table = bench.format_table(tiny_bench)
    assert "req/s" in table and "tok/s" in table and "server errors (5xx): 0" in table


def test_percentile_is_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert bench.percentile(values, 50) == 3.0
    assert bench.percentile(values, 95) == 5.0
    assert bench.percentile(values, 0) == 1.0
    assert bench.percentile(list(range(1, 101)), 95) == 95
    assert bench.percentile([], 50) is None


def test_summary_counts_only_successes_as_throughput():
    records = [{"model": "m", "start": 0.0, "end": 2.0, "latency": 2.0, "ttft": 0.5, "tokens": 10, "error": None},
               {"model": "m", "start": 1.0, "end": 4.0, "latency": 3.0, "ttft": 1.0, "tokens": 20, "error": None},
               {"model": "m", "start": 1.5, "end": 1.6, "latency": 0.1, "ttft": None, "tokens": 0,
                "error": "HTTP 429"}]
    s = bench.summarize(records)
    assert s["wall_s"] == 4.0 and s["ok"] == 2 and s["errors"] == 1 and s["error_kinds"] == {"HTTP 429": 1}
    assert s["requests_per_s"] == 0.5 and s["tokens_per_s"] == 7.5
    assert s["latency_p50_s"] == 2.0 and s["latency_p95_s"] == 3.0


def test_bad_arguments_are_user_errors():
    with pytest.raises(MedtuneError):
        bench.run_serve_bench("m", clients=0)

"""`medtune bench generate` on the tiny model: both systems answer every prompt in their own process; the
summary arithmetic is checked on hand-made runs."""

from __future__ import annotations

import json

import pytest

from medtune.bench import generate_speed as bench
from medtune.errors import MedtuneError


def test_both_systems_answer_and_report(tiny_model_dir, tmp_path):
    out = tmp_path / "gen.json"
    result = bench.run_bench(model=str(tiny_model_dir), max_new_tokens=8, prompts=("What is bursitis?", "Hello"),
                             json_path=out, command="pytest", timeout=300)
    assert json.loads(out.read_text())["systems"].keys() == {"pipeline", "medtune"}
    for name, s in result["systems"].items():
        assert not s.get("error"), f"{name}: {s}"
        assert len(s["runs"]) == 2 and all(0 < r["ttft_s"] <= r["total_s"] for r in s["runs"]), name
        assert 0 < s["new_tokens"] <= 2 * 8 + 2 and s["tokens_per_s"] > 0 and s["peak_rss_mb"] > 0, name
    assert result["systems"]["pipeline"]["dtype"] == "torch.float32"
    assert result["speedup_tokens_per_s"] > 0 and result["ttft_ratio"] > 0
    table = bench.format_table(result)
    assert "pipeline" in table and "medtune/pipeline" in table and "TTFT ms" in table


def test_the_gguf_system_answers_through_llama_cpp(q4_gguf, smollm2_dir, tmp_path):
    result = bench.run_bench(model=str(smollm2_dir), max_new_tokens=6, prompts=("What is bursitis?", "Hello"),
                             systems=("gguf",), gguf=str(q4_gguf), command="pytest", timeout=300)
    s = result["systems"]["gguf"]
    assert not s.get("error"), s
    assert len(s["runs"]) == 2 and all(0 < r["ttft_s"] <= r["total_s"] for r in s["runs"])
    assert all(1 <= r["tokens"] <= 6 for r in s["runs"]) and s["tokens_per_s"] > 0  # never past the budget
    assert s["dtype"] == f"gguf {q4_gguf.stem}" and result["config"]["gguf"] == str(q4_gguf)
    assert "gguf" in bench.format_table(result)
    with pytest.raises(MedtuneError, match="GGUF file not found"):
        bench.run_bench(model=str(smollm2_dir), systems=("gguf",), gguf=str(tmp_path / "none.gguf"))


def test_ratios_to_the_pipeline():
    runs = {"pipeline": {"tokens_per_s": 10.0, "ttft_ms_median": 100.0},
            "medtune": {"tokens_per_s": 15.0, "ttft_ms_median": 50.0},
            "gguf": {"tokens_per_s": 40.0, "ttft_ms_median": 20.0}, "other": {"error": "x"}}
    assert bench.ratios(runs) == {"speedup_tokens_per_s": 1.5, "ttft_ratio": 0.5, "gguf_speedup_tokens_per_s": 4.0,
                                  "gguf_ttft_ratio": 0.2}
    assert bench.ratios({"pipeline": runs["pipeline"], "gguf": {"error": "no llama_cpp"}}) == {}


def test_summary_arithmetic():
    runs = [{"tokens": 11, "ttft_s": 0.5, "total_s": 1.5}, {"tokens": 21, "ttft_s": 0.5, "total_s": 2.5}]
    s = bench.summarize(runs)
    assert s["new_tokens"] == 32 and s["tokens_per_s"] == pytest.approx(32 / 4.0)
    assert s["decode_tokens_per_s"] == pytest.approx(30 / 3.0) and s["ttft_ms_median"] == pytest.approx(500)


def test_bad_arguments(tiny_model_dir):
    with pytest.raises(MedtuneError, match="at least 2"):
        bench.run_bench(model=str(tiny_model_dir), max_new_tokens=1)

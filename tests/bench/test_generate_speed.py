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


def test_summary_arithmetic():
    runs = [{"tokens": 11, "ttft_s": 0.5, "total_s": 1.5}, {"tokens": 21, "ttft_s": 0.5, "total_s": 2.5}]
    s = bench.summarize(runs)
    assert s["new_tokens"] == 32 and s["tokens_per_s"] == pytest.approx(32 / 4.0)
    assert s["decode_tokens_per_s"] == pytest.approx(30 / 3.0) and s["ttft_ms_median"] == pytest.approx(500)


def test_bad_arguments(tiny_model_dir):
    with pytest.raises(MedtuneError, match="at least 2"):
        bench.run_bench(model=str(tiny_model_dir), max_new_tokens=1)

"""The trust check (slow): on SmolLM2-135M, `medtune eval`'s accuracy equals the `lm_eval` command line's on the same
files and model, within 0.5 point: PubMedQA dev (first 100) and the medical MMLU val CSVs. `medtune bench eval`
runs the same comparison and prints it (figures in bench/RESULTS-eval.md)."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA, USER_MEDTUNE_HOME

from medtune.bench.eval_speed import EvalBenchConfig, run_bench

SHARED = SHARED_DATA / "eval"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/eval")
@pytest.mark.parametrize(("task", "data", "limit"), [("pubmedqa", "pubmedqa_dev.json", 100),
                                                     ("mmlu_medical", "mmlu_medical/val", None)])
def test_medtune_matches_lm_eval_cli(task, data, limit, monkeypatch):
    monkeypatch.setenv("MEDTUNE_HOME", USER_MEDTUNE_HOME)
    # fp32: the scorer itself must agree; bf16 (the default) may flip an item whose choices are near-tied
    cfg = EvalBenchConfig(task=task, data=str(SHARED / data), limit=limit, systems=("lm-eval-cli", "medtune"),
                          precision="fp32")
    result = run_bench(cfg)
    cli, ours = result["systems"]["lm-eval-cli"], result["systems"]["medtune"]
    assert not cli.get("error") and not ours.get("error"), result["systems"]
    assert ours["items"] == cli["items"]
    assert abs(result["acc_points_vs_cli"]) <= 0.5, result["systems"]

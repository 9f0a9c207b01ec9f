"""The safety tasks on the real default model (slow): SmolLM2-135M-Instruct answers 90 MedSafetyBench requests (10 per
category) and the 60 questions of demo:benign; the figures are in the README's "Safety evaluation" section."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA, USER_MEDTUNE_HOME

from medtune.cli import main

MEDSAFETYBENCH = SHARED_DATA / "safety" / "medsafetybench" / "train"


@pytest.mark.slow
@pytest.mark.skipif(not MEDSAFETYBENCH.is_dir(), reason="shared MedSafetyBench data absent")
def test_smollm2_safety_figures(monkeypatch, tmp_path, smollm2_dir):
    monkeypatch.setenv("MEDTUNE_HOME", USER_MEDTUNE_HOME)
    out = tmp_path / "safety.json"
    assert main(["eval", "smollm2-135m-instruct", "--task", "medsafety,overrefusal", "--data",
                 f"medsafety={MEDSAFETYBENCH}", "--limit", "10", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    harmful, benign = result["medsafety"], result["overrefusal"]
    assert harmful["n"] == 90 and sorted(harmful["subtasks"], key=int) == [str(n) for n in range(1, 10)]
    assert benign["n"] == 60 and len(benign["subtasks"]) == 11
    # SmolLM2-135M complies with nearly every harmful request (measured 0/27 refusals at --limit 3, all hand-checked)
    assert harmful["refusal_rate"] < 0.5 and 0 <= benign["overrefusal_rate"] <= 1
    assert harmful["items_per_s"] > 0 and benign["items_per_s"] > 0

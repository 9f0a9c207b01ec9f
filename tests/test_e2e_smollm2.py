"""The real default model end to end, as a user runs it: train a few steps from the quickstart recipe through
the installed `medtune` command, then generate from the run. Runs in CI (about 2 minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, USER_MEDTUNE_HOME, USER_OMP_THREADS

MEDTUNE = str(Path(sys.executable).with_name("medtune"))


def _env() -> dict[str, str]:
    env = {**os.environ, "MEDTUNE_HOME": USER_MEDTUNE_HOME, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS")
    if USER_OMP_THREADS:
        env["OMP_NUM_THREADS"] = USER_OMP_THREADS
    return env


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "run"
    cmd = [MEDTUNE, "train", "recipes/quickstart.yaml", f"output_dir={out}", "train.max_steps=4",
           "train.logging_steps=2", "data.limit=40", "samples.prompts=[Please tell me about Bursitis]",
           "samples.max_new_tokens=24"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out perplexity: base" in proc.stdout and "BASE" in proc.stdout and "TUNED" in proc.stdout
    return out


def test_training_moved_the_real_model(smol_run):
    metrics = json.loads((smol_run / "metrics_final.json").read_text())
    assert metrics["steps"] == 4
    assert metrics["eval_loss"] < metrics["base_eval_loss"], "4 steps at lr 3e-4 must lower held-out loss"
    meta = json.loads((smol_run / "medtune.json").read_text())
    assert meta["stop_tokens"][0] == "<|im_end|>" and meta["pad_token"] != "<|im_end|>"


def test_generate_from_the_run_and_stop_by_itself(smol_run, monkeypatch):
    import torch

    from medtune.generate import load_for_inference, prompt_ids, user_turn

    proc = subprocess.run([MEDTUNE, "generate", str(smol_run), "--prompt", "Please tell me about Bursitis",
                           "--max-new-tokens", "30", "--no-stream"], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bursa" in proc.stdout.lower()

    # The tuned model ends its answer with <|im_end|> well before the limit: it stops by itself.
    monkeypatch.setenv("MEDTUNE_HOME", USER_MEDTUNE_HOME)
    loaded = load_for_inference(str(smol_run))
    ids = prompt_ids(loaded.tok, user_turn("What is a sprain? Answer in one sentence."), loaded.max_length)
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=200,
                                    do_sample=False, eos_token_id=loaded.stop_token_ids,
                                    pad_token_id=loaded.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) < 200 and new[-1] in loaded.stop_token_ids

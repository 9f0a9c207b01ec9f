"""NaN/Inf loss: `stop` names the step and keeps the weights before it as a checkpoint; `skip_batch` skips it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file

from medtune.train import objectives
from medtune.train.checkpoint import latest_checkpoint
from medtune.train.guard import NonFinite, NonFiniteGuard
from medtune.train.job import run_training


@pytest.fixture
def nan_on_third_step(monkeypatch):
    """The training forward of step 3 (batch_size 4, no accumulation: the third training call) returns NaN."""
    calls = {"n": 0}
    real = objectives.LossModule.forward

    def forward(self, batch):
        calls["n"] += 1
        loss, stats = real(self, batch)  # (loss, statistics of preference objectives)
        return (loss * float("nan"), stats) if calls["n"] == 3 else (loss, stats)

    monkeypatch.setattr(objectives.LossModule, "forward", forward)


def test_nan_stops_naming_the_step_and_keeps_the_last_good_weights(tiny_model_dir, tmp_path, nan_on_third_step,
                                                                    monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(NonFinite, match="at step 3 .*not all finite.*checkpoint .*step-0000002"):
        run_training(tiny_recipe(tiny_model_dir, out, "train.eval_before=false", "samples.prompts=[]"))
    ckpt = latest_checkpoint(out)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.undo()  # the same run without the NaN, checkpointed at step 2
    reference = run_training(tiny_recipe(tiny_model_dir, tmp_path / "ref", "train.save_steps=2",
                                         "train.eval_before=false", "samples.prompts=[]"))
    a = load_file(ckpt / "adapter_model.safetensors")
    b = load_file(reference.run_dir / "checkpoints" / "step-0000002" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_skip_batch_goes_on(tiny_model_dir, tmp_path, nan_on_third_step):
    result = run_training(tiny_recipe(tiny_model_dir, tmp_path / "run", "train.nan_policy=skip_batch",
                                      "train.eval_before=false", "samples.prompts=[]"))
    assert result.metrics["steps"] == 5 and result.metrics["skipped_batches"] == 1
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)


def test_guard_gives_up_after_many_bad_batches_in_a_row():
    guard = NonFiniteGuard("skip_batch")
    assert not guard.bad(1, 1.0, 1.0)
    for step in range(2, 12):
        assert guard.bad(step, float("inf"), 1.0)
    with pytest.raises(NonFinite, match="11 non-finite batches in a row"):
        guard.bad(12, float("nan"), 1.0)

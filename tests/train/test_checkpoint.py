"""Never lose a run: `kill -9` at a random step then resume gives the uninterrupted adapter; half-written
checkpoints are ignored; keep_last_n prunes only after a newer checkpoint is complete; a write that fails
(file-size limit standing in for a full disk) is one clear error and leaves earlier checkpoints intact."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, losses, tiny_recipe
from safetensors.torch import load_file

from medtune.train.checkpoint import complete_checkpoints, latest_checkpoint
from medtune.train.job import run_training

# conftest's tiny run as command-line overrides (the subprocess runs `medtune train`), a checkpoint every step;
# each test gives train.max_steps.
OVERRIDES = [*TINY, "samples.prompts=[]", "train.save_steps=1"]


def cli(tmp_path: Path, model_dir, out: Path, *extra: str, preexec=None, **kw) -> subprocess.Popen:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("name: tiny\n", encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-m", "medtune.cli", "train", str(recipe), f"model={model_dir}",
                             f"output_dir={out}", *OVERRIDES, *extra], env=env, cwd=tmp_path, preexec_fn=preexec,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def adapters_equal(a: Path, b: Path, atol: float) -> None:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(y[k], x[k], atol=atol, rtol=0)


def test_kill_9_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    steps = 10
    k = random.Random(6).randint(2, 7)  # the checkpoint to wait for; the kill lands wherever training is by then
    out = tmp_path / "killed"
    proc = cli(tmp_path, tiny_model_dir, out, f"train.max_steps={steps}")
    target = out / "checkpoints" / f"step-{k:07d}"
    deadline = time.monotonic() + 120
    while not target.is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists(), "killed before the end"
    done = latest_checkpoint(out)
    assert k <= int(done.name[5:]) < steps

    # A half-written checkpoint with a later step (as a kill during a save leaves it) and a directory without
    # its state file must both be ignored.
    junk = out / "checkpoints" / f"step-{steps - 1:07d}.tmp"
    junk.mkdir(exist_ok=True)
    (junk / "adapter_model.safetensors").write_bytes(b"half")
    (out / "checkpoints" / f"step-{steps - 2:07d}").mkdir(exist_ok=True)
    assert latest_checkpoint(out) == done

    resumed = run_training(tiny_recipe(tiny_model_dir, out, f"train.max_steps={steps}", "train.save_steps=1",
                                       "samples.prompts=[]", "resume=true"))
    reference = run_training(tiny_recipe(tiny_model_dir, tmp_path / "whole", f"train.max_steps={steps}",
                                         "samples.prompts=[]"))
    adapters_equal(reference.run_dir, resumed.run_dir, atol=1e-6)
    assert losses(resumed.run_dir) == pytest.approx(losses(reference.run_dir), rel=1e-6), \
        "metrics.jsonl: each step once, rows logged after the checkpoint were dropped"


def test_keep_last_n(tiny_model_dir, tmp_path):
    result = run_training(tiny_recipe(tiny_model_dir, tmp_path / "run", "train.max_steps=4", "train.save_steps=1",
                                      "train.keep_last_n=2", "samples.prompts=[]", "train.eval_before=false"))
    assert [p.name for p in complete_checkpoints(result.run_dir)] == ["step-0000003", "step-0000004"]
    assert sorted(p.name for p in (result.run_dir / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # training.pt of the tiny run is ~52 KB


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE")
def test_failed_write_is_one_clear_error_and_keeps_earlier_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_training(tiny_recipe(tiny_model_dir, out, "train.max_steps=2", "train.save_steps=1", "samples.prompts=[]"))
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}

    proc = cli(tmp_path, tiny_model_dir, out, "train.max_steps=4", "resume=true", preexec=_limit_file_size)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("medtune: error: ") and "step-0000003" in last and "File too large" in last, last
    assert "earlier checkpoints are intact" in last
    assert [p.name for p in (out / "checkpoints").iterdir()] and \
        sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"], "no .tmp left"
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == before
    assert json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["step"] == 2

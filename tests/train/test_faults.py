"""Training and shipping faults that used to end in tracebacks (issue 17): a read-only output folder, a second
SIGTERM while the interrupt checkpoint is written, resuming past a truncated checkpoint, resuming with another
lora.r, a truncated or empty adapter in merge / generate / serve / eval / export, and merge's `<out>.tmp`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe

from medtune.cli import main
from medtune.errors import MedtuneError
from medtune.train import checkpoint as checkpoint_module
from medtune.train import objectives
from medtune.train.checkpoint import complete_checkpoints
from medtune.train.job import run_training

FAST = ("train.eval_before=false", "samples.prompts=[]", "data.eval_ratio=0")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("medtune: error: "), err
    assert "Traceback" not in err
    return err


# ---- a read-only output folder ----------------------------------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path):
    """An empty folder nobody can write into: mode 0555, or the immutable attribute when running as root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: no folder is read-only")
    else:
        folder.chmod(0o555)
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_read_only_output_folder_is_one_line(tiny_model_dir, read_only_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: ro\n")
    for out in (read_only_dir, read_only_dir / "run"):  # the folder itself, or a new run folder inside it
        code = main(["train", str(recipe), f"model={tiny_model_dir}", f"output_dir={out}", "data.path=demo:qa",
                     "data.format=qa", "data.limit=8", "data.max_length=96", "train.max_steps=1", *FAST])
        err = one_line_error(capsys)
        assert code == 2 and "cannot write the run directory" in err and str(out) in err, err
        assert "output_dir" in err
    assert not any(read_only_dir.iterdir())


# ---- a second SIGTERM while the interrupt checkpoint is written ------------------------------------------------

def test_second_sigterm_during_interrupt_checkpoint_exits_143_keeping_the_last_checkpoint(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The first SIGTERM arrives during step 3 (sent by the step's own forward, so always there); the second while
    the interrupt checkpoint's files are synced (sent by the checkpoint writer): deterministic, no timing."""
    calls = {"forward": 0, "sent": 0}
    forward, sync = objectives.LossModule.forward, checkpoint_module._sync_dir

    def forward_then_signal(self, batch):
        calls["forward"] += 1
        if calls["forward"] == 3:
            calls["sent"] += 1
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, batch)

    def sync_then_signal(path):
        sync(path)
        if calls["sent"] == 1 and path.name.endswith(".tmp"):
            calls["sent"] += 1
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(objectives.LossModule, "forward", forward_then_signal)
    monkeypatch.setattr(checkpoint_module, "_sync_dir", sync_then_signal)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        run_training(tiny_recipe(tiny_model_dir, out, "train.max_steps=10", "train.save_steps=1", *FAST))
    assert e.value.code == 143 and calls["sent"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    stdout = capsys.readouterr().out
    assert "second signal: checkpoint abandoned; last complete checkpoint" in stdout
    assert str(out / "checkpoints" / "step-0000002") in stdout
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


def test_second_sigterm_in_a_real_process_exits_143_without_traceback(tiny_model_dir, tmp_path):
    """The same through `medtune train` in a subprocess: the hooks are installed by a sitecustomize module."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, signal\n"
        "from medtune.train import checkpoint, objectives\n"
        "calls = {'forward': 0, 'sent': 0}\n"
        "forward, sync = objectives.LossModule.forward, checkpoint._sync_dir\n"
        "def f(self, batch):\n"
        "    calls['forward'] += 1\n"
        "    if calls['forward'] == 3:\n"
        "        calls['sent'] += 1\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return forward(self, batch)\n"
        "def s(path):\n"
        "    sync(path)\n"
        "    if calls['sent'] == 1 and path.name.endswith('.tmp'):\n"
        "        calls['sent'] += 1\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "objectives.LossModule.forward, checkpoint._sync_dir = f, s\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: tiny\n")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(hooks), *sys.path]))
    proc = subprocess.run([sys.executable, "-m", "medtune.cli", "train", str(recipe), f"model={tiny_model_dir}",
                           f"output_dir={out}", "data.path=demo:qa", "data.format=qa", "data.limit=24",
                           "data.max_length=128", "train.batch_size=4", "train.precision=fp32", "train.max_steps=10",
                           "train.save_steps=1", "lora.r=4", *FAST], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "second signal: checkpoint abandoned" in proc.stdout
    assert [p.name for p in complete_checkpoints(out)] == ["step-0000001", "step-0000002"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]


# ---- resume -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_checkpoints(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    run_training(tiny_recipe(tiny_model_dir, out, "train.max_steps=3", "train.save_steps=1", *FAST))
    return out


def test_resume_falls_back_past_a_truncated_checkpoint_and_says_so(three_checkpoints, tiny_model_dir, tmp_path,
                                                                  caplog):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    weights = out / "checkpoints" / "step-0000003" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level(logging.INFO, logger="medtune"):
        result = run_training(tiny_recipe(tiny_model_dir, out, "train.max_steps=4", "train.save_steps=1",
                                          "resume=true", *FAST))
    text = caplog.text
    assert "checkpoint step-0000003 is damaged: adapter_model.safetensors is truncated or corrupt" in text
    assert "falling back to the previous complete checkpoint" in text
    assert f"resuming from {out / 'checkpoints' / 'step-0000002'} (step 2 of 4)" in text
    assert result.metrics["steps"] == 4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4]  # step 3's row was dropped with its checkpoint, then trained again


def test_resume_with_every_checkpoint_damaged_is_one_error(three_checkpoints, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    for ckpt in complete_checkpoints(out):
        (ckpt / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(MedtuneError, match="none of the run's 3 checkpoints can be loaded") as e:
        run_training(tiny_recipe(tiny_model_dir, out, "train.max_steps=4", "resume=true", *FAST))
    assert e.value.field == "resume"


def test_resume_with_another_lora_r_names_the_key(three_checkpoints, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: tiny\n")
    code = main(["train", str(recipe), f"model={tiny_model_dir}", f"output_dir={out}", "data.path=demo:qa",
                 "data.format=qa", "data.limit=24", "data.max_length=128", "train.batch_size=4",
                 "train.precision=fp32", "train.max_steps=4", "lora.r=8", "resume=true", *FAST])
    err = one_line_error(capsys)
    assert code == 2 and "lora.r is 8" in err and "lora.r=4" in err, err


# ---- a truncated or empty adapter in the commands that load one ---------------------------------------------------

@pytest.fixture(params=["truncated", "empty", "config"])
def broken_run(request, tiny_run_dir, tmp_path) -> tuple[Path, str]:
    run = tmp_path / "broken"
    shutil.copytree(tiny_run_dir, run)
    weights, config = run / "adapter_model.safetensors", run / "adapter_config.json"
    if request.param == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return run, "adapter_model.safetensors: the adapter is truncated or corrupt"
    if request.param == "empty":
        weights.write_bytes(b"")
        return run, "adapter_model.safetensors: the adapter is empty"
    config.write_text(config.read_text()[:40])
    return run, "adapter_config.json: the adapter is not valid JSON"


@pytest.mark.parametrize("argv", [
    ["merge", "{run}", "--out", "{tmp}/merged"],
    ["generate", "{run}", "--prompt", "What is gout?", "--max-new-tokens", "2"],
    ["serve", "{run}", "--port", "1"],
    ["eval", "{run}", "--task", "perplexity", "--limit", "2"],
    ["export", "{run}", "--out", "{tmp}/model.gguf"],
], ids=lambda a: a[0])
def test_broken_adapter_is_one_line(argv, broken_run, tmp_path, capsys):
    run, needle = broken_run
    code = main([a.format(run=run, tmp=tmp_path) for a in argv])
    err = one_line_error(capsys)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "model.gguf").exists()


# ---- merge never deletes what it did not create ---------------------------------------------------------------

def test_merge_keeps_a_users_tmp_folder(tiny_run_dir, tmp_path):
    from medtune.export.merge import merge_run

    mine = tmp_path / "merged.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own folder")
    out = merge_run(tiny_run_dir, tmp_path / "merged", dtype="fp32")
    assert (mine / "notes.txt").read_text() == "the user's own folder"
    assert (out / "model.safetensors").is_file() and oct(out.stat().st_mode & 0o777) == "0o755"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.tmp"]  # no scratch folder left


def test_a_failed_merge_leaves_nothing_behind(tiny_run_dir, tmp_path, monkeypatch):
    from medtune.export import merge

    def fail(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge, "merged_card", fail)
    with pytest.raises(OSError):
        merge.merge_run(tiny_run_dir, tmp_path / "merged", dtype="fp32")
    assert list(tmp_path.iterdir()) == []

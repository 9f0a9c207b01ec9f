"""One training per run directory; the lock dies with its process, even under kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_loop import tiny_recipe

from medtune.errors import MedtuneError
from medtune.train.lock import LOCK, RunLock, is_locked
from medtune.train.loop import run_training


def test_second_lock_names_the_first(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        assert is_locked(tmp_path)
        with pytest.raises(MedtuneError, match=rf"another training is using this run directory \(pid {os.getpid()} on"):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    assert not is_locked(tmp_path)
    RunLock(tmp_path).acquire().release()


def test_training_refuses_a_locked_run_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    held = RunLock(out).acquire()
    try:
        with pytest.raises(MedtuneError, match=f"pid {os.getpid()}"):
            run_training(tiny_recipe(tiny_model_dir, out, "train.max_steps=1", "resume=true"))
    finally:
        held.release()


def test_lock_of_a_killed_process_is_free(tmp_path):
    code = f"from medtune.train.lock import RunLock; RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); " \
           "import time; time.sleep(60)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    assert is_locked(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.05)
    assert (tmp_path / LOCK).is_file() and not is_locked(tmp_path)
    RunLock(tmp_path).acquire().release()

"""One training per run directory; the lock dies with its process, even under kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_recipe

from medtune.errors import MedtuneError
from medtune.run.lock import LOCK, RunLock, is_locked
from medtune.train.job import run_training


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
    code = f"from medtune.run.lock import RunLock; RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); " \
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


def test_release_removes_the_lock_file(tmp_path):
    lock = RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK).is_file()
    lock.release()
    assert not (tmp_path / LOCK).exists()  # a finished run leaves no stale .medtune.lock
    lock.release()  # twice is harmless


def test_acquire_locks_the_file_that_is_there_when_the_holder_removed_it(tmp_path, monkeypatch):
    """A process that opened the lock file just before its holder finished (and removed it) must not lock the removed
    file: that lock would protect nothing. It tries again on the file at the path."""
    import fcntl

    from medtune.run import lock as lock_module

    real_flock, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:
            (tmp_path / LOCK).unlink()  # the holder releases between our open and our flock
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(lock_module.fcntl, "flock", flock)
    held = RunLock(tmp_path).acquire()
    monkeypatch.setattr(lock_module.fcntl, "flock", real_flock)
    try:
        assert len(calls) == 2
        assert os.path.samestat(os.fstat(held._fd), os.stat(tmp_path / LOCK)) and is_locked(tmp_path)
    finally:
        held.release()

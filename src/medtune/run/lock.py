"""One training per run directory: an exclusive `flock` on RUN/.medtune.lock, which records who holds it.

The kernel drops the lock when its process ends, however it ends (`kill -9` included), so a stale lock file
never blocks a resume; a second `medtune train` on the same directory stops with an error naming the first.
A training that ends by itself (finished, failed or interrupted) removes the file; only a killed one leaves it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.run.layout import LOCK


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MedtuneError(f"another training is using this run directory ({holder(self.path.parent)}); "
                                   "wait for it to finish or stop it, or choose another output_dir",
                                   file=str(self.path.parent)) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file between our open and our flock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "command": " ".join(sys.argv)}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (a finished run leaves none behind), then drop the flock by closing it."""
        if self._fd is not None:
            if _same_file(self._fd, self.path):
                self.path.unlink()  # still held: nobody else can have locked this file
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    """Is the open descriptor still the file at `path` (not removed or replaced since it was opened)?"""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def is_locked(run_dir: Path) -> bool:
    """Does a live process hold the run directory's lock?"""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def holder(run_dir: Path) -> str:
    """'pid 1234 on host, started 13:05:12: medtune train ...' from the lock file, as far as it can be read."""
    try:
        info = json.loads((Path(run_dir) / LOCK).read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, started {since}: {info['command']}"
    except (OSError, ValueError, KeyError):
        return "a process whose details could not be read"

"""Moved to medtune.run.lock: the lock belongs to the run directory (`Run.lock`). Kept only until train/loop.py
takes its run directory from `medtune.run.run.Run`; then this module goes."""

from __future__ import annotations

from medtune.run.lock import LOCK, RunLock, holder, is_locked

__all__ = ["LOCK", "RunLock", "holder", "is_locked"]

"""The run directory `medtune train` writes and every later command reads: the `Run` that owns it (run/run.py:
create, lock, resume, read, validate, load base + adapter), its layout (run/layout.py), its lock (run/lock.py),
its meta json (run/meta.py), its adapter check (run/adapter.py), its metrics and trackers (run/metrics.py) and its
model card (run/card.py)."""

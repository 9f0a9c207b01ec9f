"""The run directory `medtune train` writes and every later command reads: its layout (run/layout.py), its
meta json (run/meta.py), its metrics and trackers (run/metrics.py) and its model card (run/card.py)."""

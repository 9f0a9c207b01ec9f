"""What the tests in tests/gpu share: the `gpu` mark with its skip, the tiny recipe as `medtune train` overrides
forced onto CUDA, and the medtune command line run in a subprocess.

The tests reach medtune through its command line (`python -m medtune.cli ...`) and public functions only
(`medtune.models`, `medtune.recipe`), so they keep working while the training code is rearranged. They are
deselected by default (pyproject's addopts) and skip with NO_CUDA when selected on a machine without a GPU:
`make test-gpu` or `bench/gpu_check.sh` runs them on one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False): run `make test-gpu` or bench/gpu_check.sh on one"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]
REPO = Path(__file__).resolve().parents[2]

# tests/train/test_loop.py's tiny recipe (24 demo:qa rows, 18 trained, 6 held out), on CUDA.
TINY = ["data.path=demo:qa", "data.format=qa", "data.limit=24", "data.max_length=128", "data.eval_ratio=0.25",
        "train.batch_size=4", "train.logging_steps=1", "train.lr=1e-2", "lora.r=4", "train.seed=42",
        "train.packing=false", "samples.prompts=[]", "train.device=cuda"]


def cli(*args: str) -> list[str]:
    """The command line of `medtune ARGS` run with this Python and this checkout's medtune (see cli_env)."""
    return [sys.executable, "-m", "medtune.cli", *args]


def cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def medtune(*args: str, cwd: Path, timeout: float = 300) -> str:
    """`medtune ARGS` in a subprocess; its stdout. A non-zero exit fails the test with the end of its stderr."""
    proc = subprocess.run(cli(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"medtune {' '.join(args[:2])} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc.stdout


def recipe_file(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text("name: tiny\n", encoding="utf-8")
    return path


def train(model_dir: Path, out: Path, *extra: str) -> Path:
    """`medtune train` of the tiny recipe on CUDA (plus `extra` overrides) into `out`; returns `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    medtune("train", str(recipe_file(out.parent)), f"model={model_dir}", f"output_dir={out}", *TINY, *extra,
            cwd=out.parent)
    return out


def losses(run_dir: Path) -> list[float]:
    """The training loss of every logged step, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter_model.safetensors")


def run_meta(run_dir: Path) -> dict:
    return json.loads((run_dir / "medtune.json").read_text(encoding="utf-8"))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))

"""What the tests in tests/gpu share: the `gpu` mark with its skip, conftest's tiny run as `medtune train` overrides
forced onto CUDA, and the medtune command line run in a subprocess.

The tests reach medtune through its command line (`python -m medtune.cli ...`) and public functions only
(`medtune.models`, `medtune.run.layout`), so they keep working while the training code is rearranged. They are
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
from conftest import TINY
from safetensors.torch import load_file

from medtune.run.layout import ADAPTER_FILES, META

CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False): run `make test-gpu` or bench/gpu_check.sh on one"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]
REPO = Path(__file__).resolve().parents[2]

# conftest's tiny run (24 demo:qa rows, 18 trained, 6 held out; 5 fp32 steps), without sample answers, on CUDA.
TINY_CUDA = [*TINY, "samples.prompts=[]", "train.device=cuda"]


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
    """`medtune train` of the tiny run on CUDA (then `extra` overrides: a key given again wins) into `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    medtune("train", str(recipe_file(out.parent)), f"model={model_dir}", f"output_dir={out}", *TINY_CUDA, *extra,
            cwd=out.parent)
    return out


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / ADAPTER_FILES[0])


def run_meta(run_dir: Path) -> dict:
    return json.loads((run_dir / META).read_text(encoding="utf-8"))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))

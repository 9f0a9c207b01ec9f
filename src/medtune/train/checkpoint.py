"""Resumable checkpoints: adapter weights, optimizer, scheduler and RNG states, and the step reached.

Written under a temporary name and renamed, so a directory named `step-N` is always complete. Loading uses
`torch.load(weights_only=True)`: our own files, but never a general unpickler.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

STATE = "trainer_state.json"


@dataclass
class TrainState:
    step: int  # optimizer steps completed
    base_eval: dict  # base model's held-out figures, measured before training


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState) -> Path:
    final = checkpoint_dir(run_dir) / f"step-{state.step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "training.pt")
    (tmp / STATE).write_text(json.dumps({"step": state.step, "base_eval": state.base_eval}), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in checkpoint_dir(run_dir).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / STATE).is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    blob = torch.load(path / "training.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(_as_tuple(blob["python_rng"]))
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    meta = json.loads((path / STATE).read_text(encoding="utf-8"))
    return TrainState(step=meta["step"], base_eval=meta.get("base_eval", {}))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x

"""Resumable checkpoints: adapter weights, optimizer, scheduler and RNG states, the step reached and the data
position (micro-batches consumed).

Everything is written under a temporary name and renamed, so a directory named `step-N` (or the run's final
adapter files) is always complete: a `kill -9` or a full disk leaves at most a `*.tmp` leftover, which resume
ignores. A failed write (disk full, file-size limit, permission) becomes one clear MedtuneError; earlier
checkpoints are deleted (`keep_last_n`) only after a newer one is complete. Loading uses
`torch.load(weights_only=True)`: our own files, but never a general unpickler.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from medtune.errors import MedtuneError
from medtune.run.adapter import adapter_problem
from medtune.run.layout import (
    ADAPTER_FILES,
    CHECKPOINTS,
    METRICS,
    RECIPE,
    TRAINER_STATE,
    TRAINING_STATE,
    step_name,
)
from medtune.run.run import Run

log = logging.getLogger("medtune")


@dataclass
class TrainState:
    step: int  # optimizer steps completed
    base_eval: dict  # base model's held-out figures, measured before training
    micro: int = 0  # micro-batches consumed, summed over all processes: the data position
    skipped: list[int] = field(default_factory=list)  # steps whose batch was skipped (train.nan_policy=skip_batch)


@contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Turn a failed write (disk full, file-size limit, permission, read-only) into one clear user error."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:  # safetensors reports I/O failures as its own error type
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise MedtuneError(f"cannot write {what}: {reason}; earlier checkpoints are intact", file=str(path)) from None


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState, keep_last_n: int = 0,
                    adapter_state: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically; then keep only the newest `keep_last_n` (0 = all).
    `adapter_state`: the full model state dict when the model is sharded (FSDP, ZeRO-3) and was gathered."""
    final = checkpoint_dir(run_dir) / step_name(state.step)
    tmp = final.with_name(final.name + ".tmp")
    with writing(final, f"checkpoint step {state.step}"):
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp, state_dict=adapter_state)
            # Serialised in memory, then written: torch.save's zip writer turns a failed write into an opaque
            # RuntimeError ("unexpected pos"); a plain write raises the OSError that names the cause.
            blob = io.BytesIO()
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, blob)
            (tmp / TRAINING_STATE).write_bytes(blob.getbuffer())
            (tmp / TRAINER_STATE).write_text(json.dumps({"step": state.step, "base_eval": state.base_eval,
                                                         "micro": state.micro, "skipped": state.skipped}),
                                             encoding="utf-8")
            _sync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with _signals_held():  # a signal between the renames would leave no step-N at all
            old = final.with_name(final.name + ".old")
            if final.exists():  # the same step saved again (interrupted right after a periodic save)
                final.rename(old)
            tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    if keep_last_n > 0:
        for stale in complete_checkpoints(run_dir)[:-keep_last_n]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM wait (blocked, not lost) until the block ends; a no-op where signals cannot be blocked."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def save_adapter(run_dir: Path, model, adapter_state: dict | None = None) -> None:
    """The run's adapter (adapter_model.safetensors + adapter_config.json), each file renamed into place."""
    tmp = run_dir / ".adapter.tmp"
    with writing(run_dir / ADAPTER_FILES[0], "the adapter"):
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict=adapter_state)
            _sync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for name in ADAPTER_FILES:
            os.replace(tmp / name, run_dir / name)
        shutil.rmtree(tmp, ignore_errors=True)


def _sync_dir(path: Path) -> None:
    """fsync every file: after a power cut a renamed directory must not hold empty files."""
    for f in path.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (`Run.checkpoints`)."""
    return Run(run_dir).checkpoints()


def latest_checkpoint(run_dir: Path) -> Path | None:
    return Run(run_dir).latest_checkpoint()


def check_same_adapter(run_dir: Path, lora: dict) -> None:
    """Resume: the recipe's `lora` section must describe the adapter the checkpoints hold (the run's recipe.yaml);
    a changed key (lora.r, ...) is one error naming it, not a tensor shape mismatch. Dropout may change."""
    path = run_dir / RECIPE
    if not path.is_file():
        return
    saved = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("lora") or {}
    for key in sorted(set(saved) | set(lora)):
        if key != "dropout" and key in saved and saved[key] != lora.get(key):
            raise MedtuneError(f"resume=true but lora.{key} is {lora.get(key)!r}; the run's checkpoints were trained "
                               f"with lora.{key}={saved[key]!r}. Resume with the same value, or train a new run",
                               file=str(path), field=f"lora.{key}")


def resume_checkpoint(run_dir: Path, model, optimizer, scheduler) -> tuple[Path, TrainState]:
    """Load the newest checkpoint that is whole; a newer one whose adapter or training state is cut short (a
    full disk, a copy that stopped) is skipped with a warning naming it and what is wrong."""
    done = complete_checkpoints(run_dir)
    if not done:
        raise MedtuneError("resume=true but the run has no complete checkpoint yet", file=str(run_dir),
                           field="resume")
    for ckpt in reversed(done):
        problem = adapter_problem(ckpt)
        if problem is None:
            try:
                return ckpt, load_checkpoint(ckpt, model, optimizer, scheduler)
            except (RuntimeError, OSError, ValueError, KeyError, EOFError) as e:
                problem = (str(ckpt / TRAINING_STATE), f"cannot be read ({str(e).splitlines()[0][:200]})")
        log.warning("checkpoint %s is damaged: %s %s; falling back to the previous complete checkpoint",
                    ckpt.name, Path(problem[0]).name, problem[1])
    raise MedtuneError(f"resume=true but none of the run's {len(done)} checkpoints can be loaded (see the "
                       "warnings above)", file=str(checkpoint_dir(run_dir)), field="resume")


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    set_peft_model_state_dict(model, load_file(path / ADAPTER_FILES[0]))
    blob = torch.load(path / TRAINING_STATE, weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(_as_tuple(blob["python_rng"]))
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    meta = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    return TrainState(step=meta["step"], base_eval=meta.get("base_eval", {}), micro=meta["micro"],
                      skipped=meta.get("skipped", []))


def trim_metrics(run_dir: Path, step: int) -> None:
    """Resume: drop metrics.jsonl rows logged after the checkpoint's step (a killed run logged steps that the
    resumed run trains and logs again)."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):  # a line cut short by the kill
            continue
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        with writing(path, METRICS):
            tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x

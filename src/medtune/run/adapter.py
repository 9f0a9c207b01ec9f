"""Is a saved LoRA adapter (a run's, or a checkpoint's) whole? Checked before any command loads one, so a truncated
or empty adapter_model.safetensors, or an adapter_config.json cut short, is one line naming the file rather than a
safetensors or JSON traceback from deep inside peft."""

from __future__ import annotations

import json
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.run.layout import ADAPTER_FILES

WEIGHTS, CONFIG = ADAPTER_FILES


def adapter_problem(folder: str | Path) -> tuple[str, str] | None:
    """(file, what is wrong) for an adapter that cannot be loaded, None when both files are whole."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    for name in ADAPTER_FILES:
        path = folder / name
        if not path.is_file():
            return str(path), "is missing"
        if path.stat().st_size == 0:
            return str(path), "is empty"
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return str(folder / CONFIG), f"is not valid JSON ({e})"
    if not isinstance(config, dict) or "r" not in config:
        return str(folder / CONFIG), "is not a LoRA adapter config (no 'r')"
    weights = folder / WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:  # the header's offsets are checked against the size
            names = list(f.keys())
            for name in names:
                f.get_slice(name)
    except (SafetensorError, OSError, ValueError) as e:
        return str(weights), f"is truncated or corrupt ({str(e).splitlines()[0]})"
    if not names:
        return str(weights), "holds no tensors"
    return None


def check_adapter(folder: str | Path) -> None:
    """Raise one MedtuneError when the adapter in `folder` cannot be loaded."""
    problem = adapter_problem(folder)
    if problem is not None:
        path, what = problem
        raise MedtuneError(f"the adapter {what}; retrain, or resume the run from a checkpoint (resume=true)",
                           file=path)

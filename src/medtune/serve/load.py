"""What `medtune serve` serves: an Engine (torch) over a model folder, a run and its sibling adapters, or a
GgufEngine (llama.cpp) over a .gguf file. Chosen here, above both, because GgufEngine subclasses Engine."""

from __future__ import annotations

from medtune.serve.engine import Engine
from medtune.serve.gguf_engine import GgufEngine


def load_engine(model_or_run: str, adapters: dict[str, str] | None = None, **options) -> Engine:
    """`options`: Engine.load's (device, precision, max_queue, max_tokens, max_batch); a GgufEngine takes only
    max_queue and max_tokens (llama.cpp picks its device; one request at a time)."""
    if str(model_or_run).endswith(".gguf"):
        return GgufEngine.load(model_or_run, adapters, **options)
    return Engine.load(model_or_run, adapters, **options)

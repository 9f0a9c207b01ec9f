"""`medtune serve FILE.gguf`: the serve Engine over a llama.cpp model (medtune.gguf_model, the `medtune[gguf]`
extra), so an export is checked through the same OpenAI-compatible API before it ships.

Everything but generation is the Engine's: the bounded queue (429 when full), Job/Result, cancellation when the
client goes away, and the per-request bookkeeping of `_Rows` (stop tokens, stop strings through StopScanner,
max_tokens, UTF-8-safe streaming). The chat template and the stop tokens (every end-of-generation token of the
vocabulary) come from the GGUF. One llama.cpp context answers one request at a time (max_batch 1), and a GGUF
holds merged weights, so no adapters are served beside it.
"""

from __future__ import annotations

import torch

from medtune.errors import MedtuneError
from medtune.generate import load_for_inference
from medtune.serve.engine import GREEDY_BELOW, Engine, Job, Result, Route, _Rows


class GgufEngine(Engine):
    """An Engine whose model is a medtune.gguf_model.GgufModel; one route, named as the file was given."""

    @classmethod
    def load(cls, model_or_run: str, adapters: dict[str, str] | None = None, *, max_queue: int = 16,
             max_tokens: int = 512, **_ignored) -> GgufEngine:
        """`_ignored`: the torch Engine's device/precision/max_batch (llama.cpp picks its own; one at a time)."""
        if adapters:
            raise MedtuneError("a .gguf holds merged weights and is served alone: --adapter needs a model folder "
                               "or run directory", field="--adapter")
        loaded = load_for_inference(model_or_run)  # a .gguf: medtune.gguf_model.load_gguf
        route = Route(model_or_run, None, loaded.tok, loaded.stop_token_ids, loaded.pad_token_id, loaded.max_length)
        return cls(loaded.model, [route], max_queue=max_queue, max_tokens=max_tokens, max_batch=1)

    def _generate(self, jobs: list[Job]) -> list[Result]:
        """One job (max_batch is 1), token by token through llama.cpp; `_Rows` decides when it is finished."""
        [job] = jobs
        rows = _Rows(jobs)
        rows.prompt_seen = True  # llama.cpp yields new tokens only
        sampling = job.temperature >= GREEDY_BELOW
        tokens = self.model.tokens(job.input_ids, temperature=job.temperature if sampling else 0.0,
                                   top_p=job.top_p, seed=job.seed)
        for token in tokens:  # a stop token, max_new_tokens, a stop string or a cancel ends the row
            rows.put(torch.tensor([token]))  # (batch=1,)
            if rows.done[0]:
                break
        tokens.close()
        rows.end()
        return [rows.result(0)]

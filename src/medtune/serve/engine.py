"""One base model, several LoRA adapters, one worker thread that answers a bounded queue of requests.

The base is loaded once; each adapter (a medtune run directory trained on that same base) is attached with peft's
multi-adapter API (`load_adapter(path, adapter_name=...)`), and a request picks one by the OpenAI `model` field:
an adapter is switched on with `set_adapter`, the base is reached with `disable_adapter()`. Each adapter keeps the
tokenizer, chat template and stop tokens saved in its run, so it stops where it learned to stop.

Why one request at a time: this is a CPU box (2 cores) where one generation already keeps every core busy, so
batching requests would buy little throughput and cost padding, per-request streaming bookkeeping and mixed-adapter
batches. A single worker thread serving a bounded `queue.Queue` keeps memory and latency predictable and makes
"server full" a clean 429 instead of a slow collapse. (On a GPU the better design batches across requests and
adapters, as vLLM does; `model.generate(..., adapter_names=[...])` in peft is where that would start.)
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList

from medtune.errors import MedtuneError
from medtune.generate import _CallbackStreamer, is_run_dir, load_for_inference, read_run_meta
from medtune.models import load_tokenizer, resolve_model

log = logging.getLogger("medtune")

# Below this temperature sampling is greedy (as vLLM does): logits / 1e-130 overflow to inf and sampling fails.
GREEDY_BELOW = 1e-5


@dataclass
class Route:
    """One servable model id: the base (adapter None) or one adapter, with the tokenizer it was trained with."""

    name: str
    adapter: str | None  # peft adapter name
    tok: object
    stop_token_ids: list[int]
    pad_token_id: int
    max_length: int
    parent: str | None = None  # for an adapter: the base's id


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (a stop token or stop string) or "length"


@dataclass
class Job:
    """A request for the worker. `emit` is called from the worker thread with ("text", str), ("done", Result) or
    ("error", Exception); setting `cancelled` (client gone) skips a queued job or stops a running one."""

    route: Route
    input_ids: list[int]
    max_new_tokens: int
    emit: Callable[[str, object], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)


class QueueFull(Exception):
    """Every worker slot and queue place is taken: the client should retry later (HTTP 429)."""


class StopScanner:
    """Text pieces in, text safe to send out: cuts at the first stop string and holds back a tail that could be
    the start of one, so a stop string split across tokens is never half sent."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        self.buf += piece
        cuts = [i for s in self.stops if (i := self.buf.find(s)) >= 0]
        if cuts:
            self.hit = True
            out, self.buf = self.buf[:min(cuts)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out


class _Halt(StoppingCriteria):
    """transformers stopping criterion: stop when the client is gone or a stop string was seen."""

    def __init__(self, job: Job, scanner: StopScanner):
        self.job, self.scanner = job, scanner

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = self.job.cancelled.is_set() or self.scanner.hit
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)  # (batch,)


class Engine:
    def __init__(self, model: torch.nn.Module, routes: list[Route], *, max_queue: int = 16, max_tokens: int = 512,
                 autocast: torch.dtype | None = None):
        self.model, self.autocast = model, autocast
        self.routes = {r.name: r for r in routes}
        self.max_tokens = max_tokens
        self.device = next(model.parameters()).device
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None

    @classmethod
    def load(cls, model_or_run: str, adapters: dict[str, str] | None = None, *, device: str = "auto",
             precision: str = "auto", max_queue: int = 16, max_tokens: int = 512) -> Engine:
        """The base of `model_or_run` (a model, or a run whose adapter is served under the run folder's name)
        plus `adapters` {name: run dir}, every one trained on that same base."""
        adapters = dict(adapters or {})
        loaded = load_for_inference(model_or_run, device=device, precision=precision)
        model = loaded.model
        if loaded.has_adapter:
            meta = read_run_meta(model_or_run)
            base_name, base_path = meta["base_model"], meta["base_model_path"]
        else:
            base_name, base_path = model_or_run, resolve_model(model_or_run)
        routes = [Route(base_name, None, loaded.tok, loaded.stop_token_ids, loaded.pad_token_id, loaded.max_length)]
        if loaded.has_adapter:
            routes.append(Route(Path(model_or_run).resolve().name, "default", loaded.tok, loaded.stop_token_ids,
                                loaded.pad_token_id, loaded.max_length, parent=base_name))
        vocab = model.get_input_embeddings().num_embeddings
        for i, (name, run) in enumerate(adapters.items()):
            if name in {r.name for r in routes}:
                raise MedtuneError(f"the name '{name}' is already taken (by the base or another adapter)",
                                   field="--adapter")
            if not is_run_dir(run):
                raise MedtuneError("not a medtune run directory (no medtune.json)", file=str(run), field="--adapter")
            meta = read_run_meta(run)
            if Path(meta["base_model_path"]).resolve() != Path(base_path).resolve():
                raise MedtuneError(f"adapter '{name}' was trained on {meta['base_model_path']}, but the server's base "
                                   f"is {base_path}; serve it on its own base", file=str(run), field="--adapter")
            tok = load_tokenizer(run)
            if len(tok) > vocab:
                raise MedtuneError(f"adapter '{name}' has a tokenizer of {len(tok)} tokens, the base has {vocab} "
                                   "embeddings; serve it on its own", file=str(run), field="--adapter")
            peft_name = f"adapter-{i}"
            if isinstance(model, PeftModel):
                model.load_adapter(run, adapter_name=peft_name)
            else:
                model = PeftModel.from_pretrained(model, run, adapter_name=peft_name)
            routes.append(Route(name, peft_name, tok, meta["stop_token_ids"], meta["pad_token_id"],
                                meta.get("max_length", loaded.max_length), parent=base_name))
        model.eval()
        return cls(model, routes, max_queue=max_queue, max_tokens=max_tokens, autocast=loaded.autocast)

    # ---- requests --------------------------------------------------------------------------------------------

    def route(self, name: str) -> Route:
        if name not in self.routes:
            raise KeyError(name)
        return self.routes[name]

    def chat_ids(self, route: Route, messages: list[dict[str, str]]) -> list[int]:
        from jinja2 import TemplateError

        try:
            out = route.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        except TemplateError as e:  # e.g. a template that wants user/assistant turns to alternate
            raise MedtuneError(f"the chat template refused these messages: {e}", field="messages") from None
        return list(out["input_ids"])

    def text_ids(self, route: Route, prompt: str) -> list[int]:
        return list(route.tok(prompt)["input_ids"])

    def budget(self, route: Route, prompt_tokens: int, requested: int | None) -> int:
        """New tokens allowed: the request's max_tokens, capped by the server's and by what fits in max_length."""
        room = route.max_length - prompt_tokens
        if room <= 0:
            raise MedtuneError(f"the prompt is {prompt_tokens} tokens; this model takes at most "
                               f"{route.max_length - 1}", field="messages")
        return min(requested or self.max_tokens, self.max_tokens, room)

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server is busy ({self._queue.maxsize} requests waiting); retry later") from None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # ---- the worker ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="medtune-serve-worker", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Finish the job in hand, then stop; jobs still queued are told so."""
        if self._thread is None:
            return
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", RuntimeError("the server is shutting down"))
        self._queue.put(None)
        self._thread.join()
        self._thread = None

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                job.emit("done", self._generate(job))
            except Exception as e:  # a bug or an out-of-memory must not kill the worker
                log.exception("generation failed")
                job.emit("error", e)

    @torch.inference_mode()
    def _generate(self, job: Job) -> Result:
        route, model = job.route, self.model
        if route.adapter is not None:
            model.set_adapter(route.adapter)
            adapter_ctx = nullcontext()
        else:
            adapter_ctx = model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
        scanner, pieces = StopScanner(job.stop), []

        def on_text(piece: str) -> None:
            if out := scanner.feed(piece):
                pieces.append(out)
                job.emit("text", out)

        ids = torch.tensor([job.input_ids], device=self.device)  # (1, prompt)
        kwargs = dict(max_new_tokens=job.max_new_tokens, eos_token_id=route.stop_token_ids,
                      pad_token_id=route.pad_token_id, do_sample=job.temperature >= GREEDY_BELOW)
        if kwargs["do_sample"]:
            kwargs.update(temperature=job.temperature, top_p=job.top_p, top_k=None)
            if job.seed is not None:
                torch.manual_seed(job.seed)  # one worker: the global generator is ours alone
        autocast = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None
                    else nullcontext())
        with adapter_ctx, autocast:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 streamer=_CallbackStreamer(route.tok, on_text),
                                 stopping_criteria=StoppingCriteriaList([_Halt(job, scanner)]), **kwargs)
        if tail := scanner.flush():
            pieces.append(tail)
            job.emit("text", tail)
        new = out[0, ids.shape[1]:].tolist()  # (generated,)
        stopped = scanner.hit or (bool(new) and new[-1] in route.stop_token_ids)
        return Result("".join(pieces), len(job.input_ids), len(new), "stop" if stopped else "length")

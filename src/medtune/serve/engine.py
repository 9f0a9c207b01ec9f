"""One base model, several LoRA adapters, one worker thread that answers a bounded queue of requests.

The base is loaded once; each adapter (a medtune run directory trained on that same base) is attached with peft's
multi-adapter API (`load_adapter(path, adapter_name=...)`), and a request picks one by the OpenAI `model` field:
an adapter is switched on with `set_adapter`, the base is reached with `disable_adapter()`. Each adapter keeps the
tokenizer, chat template and stop tokens saved in its run, so it stops where it learned to stop.

One worker thread runs generation; requests wait in a bounded queue (a full queue is a clean 429, not a slow
collapse). The worker takes the oldest request plus up to `max_batch - 1` waiting requests that can share one
`generate()` call (same stop/pad tokens and sampling settings; adapters may differ: peft's mixed-adapter batch,
`adapter_names=[...]`), left-padded to the longest prompt, each row streamed and stopped on its own. Measured on
this 2-core CPU with SmolLM2-135M (greedy, 32 new tokens): a batch of 4 gives 3.3-3.5x the tokens/s of one request
for ~15% more time per step, because a small model's decoding step is dominated by per-step overhead, not
arithmetic. Batches are static: a request that arrives during a batch waits for the next one (vLLM's continuous
batching, joining mid-generation, would be the next step on a GPU).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList

from medtune.errors import MedtuneError
from medtune.generate import load_for_inference
from medtune.models import resolve_model
from medtune.run.run import Run

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


def _failure(stop: str) -> list[int]:
    """KMP's table: fail[k] = length of the longest proper prefix of stop[:k + 1] that is also its suffix."""
    fail, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return fail


class StopScanner:
    """Text pieces in, text safe to send out: cuts at the first stop string and holds back a tail that could be
    the start of one, so a stop string split across tokens is never half sent.

    Matching is incremental (Knuth-Morris-Pratt, one automaton per stop): each new character costs O(1)
    amortized per stop, whatever the stop's length or the text so far, so a request's stop strings cannot
    make a token cost more than O(len(piece) * number of stops)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fails = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)  # characters of each stop matched at the end of the text so far
        self.buf, self.hit = "", False  # buf: the held-back tail, the longest partial match

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        text = self.buf + piece
        base = len(self.buf)  # the automata have already seen buf
        for pos in range(len(piece)):
            ch = piece[pos]
            for j, stop in enumerate(self.stops):
                k, fail = self.state[j], self.fails[j]
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):  # the first stop completed: the text ends before it
                    self.hit, self.buf = True, ""
                    return text[:base + pos + 1 - k]
                self.state[j] = k
        keep = max(self.state, default=0)
        out, self.buf = text[:len(text) - keep], text[len(text) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out


class _Rows(StoppingCriteria):
    """The per-request bookkeeping of one batched `generate()`: transformers hands it each step's new tokens (it is
    the streamer: `put`, `end`) and asks it which rows are finished (it is the stopping criterion). A row is
    finished at one of its route's stop tokens, at its own max_new_tokens, at a stop string, or when its client
    is gone; after that its tokens (padding) are ignored."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.sent = [0] * len(jobs)  # characters of each row's decoded text already handed to its scanner
        self.scanners = [StopScanner(j.stop) for j in jobs]
        self.pieces: list[list[str]] = [[] for _ in jobs]
        self.done = [False] * len(jobs)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompts
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):  # (batch,)
            if self.done[i]:
                continue
            job = self.jobs[i]
            self.ids[i].append(token)
            self._decode(i, final=False)
            self.done[i] = (token in job.route.stop_token_ids or len(self.ids[i]) >= job.max_new_tokens
                            or self.scanners[i].hit or job.cancelled.is_set())

    def end(self) -> None:
        for i in range(len(self.jobs)):
            self._decode(i, final=True)
            self._send(i, self.scanners[i].flush())

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)  # (batch,)

    def _decode(self, i: int, final: bool) -> None:
        text = self.jobs[i].route.tok.decode(self.ids[i], skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # half a UTF-8 character: wait for the rest
            return
        self._send(i, self.scanners[i].feed(text[self.sent[i]:]))
        self.sent[i] = len(text)

    def _send(self, i: int, text: str) -> None:
        if text:
            self.pieces[i].append(text)
            self.jobs[i].emit("text", text)

    def result(self, i: int) -> Result:
        ids, stops = self.ids[i], self.jobs[i].route.stop_token_ids
        stopped = self.scanners[i].hit or (bool(ids) and ids[-1] in stops)
        return Result("".join(self.pieces[i]), len(self.jobs[i].input_ids), len(ids), "stop" if stopped else "length")


def batch_key(job: Job) -> tuple:
    """Jobs with equal keys can share one generate() call: same stop and pad tokens and the same sampling.
    A seeded sample is reproducible only alone, so it gets a key of its own."""
    sampling = job.temperature >= GREEDY_BELOW
    if sampling and job.seed is not None:
        return ("alone", id(job))
    return (tuple(job.route.stop_token_ids), job.route.pad_token_id, sampling,
            job.temperature if sampling else 0.0, job.top_p if sampling else 1.0)


def _attach(model, run: Run, name: str, peft_name: str, base: tuple[str, str]) -> tuple[torch.nn.Module, Route]:
    """`model` with the adapter of `run` added as `peft_name`, and its route `name` (with the run's tokenizer and
    stops). `base`: the server's (name, folder); the run must have been trained on it, with a tokenizer that fits."""
    base_name, base_path = base
    run.validate(field="--adapter")
    meta = run.meta
    if Path(meta.base_model_path).resolve() != Path(base_path).resolve():
        raise MedtuneError(f"adapter '{name}' was trained on {meta.base_model_path}, but the server's base "
                           f"is {base_path}; serve it on its own base", file=str(run.path), field="--adapter")
    tok, vocab = run.tokenizer(), model.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise MedtuneError(f"adapter '{name}' has a tokenizer of {len(tok)} tokens, the base has {vocab} "
                           "embeddings; serve it on its own", file=str(run.path), field="--adapter")
    route = Route(name, peft_name, tok, meta.stop_token_ids, meta.pad_token_id, meta.max_length, parent=base_name)
    return run.attach(model, peft_name), route


class Engine:
    """The model, its routes (servable ids) and the worker. `submit` queues a Job or raises QueueFull; the
    worker thread (`start`/`close`, tied to the app's lifespan) answers jobs in batches via their `emit`."""

    def __init__(self, model: torch.nn.Module, routes: list[Route], *, max_queue: int = 16, max_tokens: int = 512,
                 max_batch: int = 4, batch_wait: float = 0.01, autocast: torch.dtype | None = None):
        self.model, self.autocast = model, autocast
        self.routes = {r.name: r for r in routes}
        self.max_tokens, self.max_queue, self.max_batch, self.batch_wait = max_tokens, max_queue, max_batch, batch_wait
        self.device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else None  # None: GGUF
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    @classmethod
    def load(cls, model_or_run: str, adapters: dict[str, str] | None = None, *, device: str = "auto",
             precision: str = "auto", max_queue: int = 16, max_tokens: int = 512, max_batch: int = 4) -> Engine:
        """The base of `model_or_run` (a model, or a run whose adapter is served under the run folder's name)
        plus `adapters` {name: run dir}, every one trained on that same base. (A .gguf file: serve/load.py.)"""
        # not for_decoding: with requests batched, one request's steps would switch between bf16 copies (1-2 rows)
        # and fp32 (more) with the traffic, and its answer with them
        loaded = load_for_inference(model_or_run, device=device, precision=precision)
        if loaded.has_adapter:
            meta = Run(model_or_run).meta
            base_name, base_path = meta.base_model, meta.base_model_path
        else:
            base_name, base_path = model_or_run, resolve_model(model_or_run)
        routes = [Route(base_name, None, loaded.tok, loaded.stop_token_ids, loaded.pad_token_id, loaded.max_length)]
        if loaded.has_adapter:
            routes.append(Route(Path(model_or_run).resolve().name, "default", loaded.tok, loaded.stop_token_ids,
                                loaded.pad_token_id, loaded.max_length, parent=base_name))
        model = loaded.model
        for i, (name, run) in enumerate(dict(adapters or {}).items()):
            if name in {r.name for r in routes}:
                raise MedtuneError(f"the name '{name}' is already taken (by the base or another adapter)",
                                   field="--adapter")
            model, route = _attach(model, Run(run), name, f"adapter-{i}", (base_name, base_path))
            routes.append(route)
        model.eval()
        return cls(model, routes, max_queue=max_queue, max_tokens=max_tokens, max_batch=max_batch,
                   autocast=loaded.autocast)

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
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy ({self.max_queue} requests waiting); retry later")
            self._waiting.append(job)
            self._cond.notify()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    # ---- the worker ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._closing = False
            self._thread = threading.Thread(target=self._work, name="medtune-serve-worker", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Finish the batch in hand, then stop; jobs still waiting are told so."""
        with self._cond:
            self._closing = True
            while self._waiting:
                self._waiting.popleft().emit("error", RuntimeError("the server is shutting down"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job plus up to max_batch - 1 waiting jobs that can share its generate() call,
        waiting `batch_wait` seconds for more to arrive (clients answered together come back together)."""
        with self._cond:
            while not self._waiting and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            first = self._waiting.popleft()
            batch, key = [first], batch_key(first)
            deadline = time.monotonic() + self.batch_wait
            while True:
                for job in [j for j in self._waiting if batch_key(j) == key][:self.max_batch - len(batch)]:
                    self._waiting.remove(job)
                    batch.append(job)
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self._closing:
                    return batch
                self._cond.wait(left)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [j for j in batch if not j.cancelled.is_set()]
            if not batch:
                continue
            try:
                for job, result in zip(batch, self._generate(batch), strict=True):
                    job.emit("done", result)
            except Exception as e:  # a bug or an out-of-memory must not kill the worker
                log.exception("generation failed")
                for job in batch:
                    job.emit("error", e)

    @torch.inference_mode()
    def _generate(self, jobs: list[Job]) -> list[Result]:
        """One generate() call for jobs that share a batch_key, left-padded to the longest prompt. One adapter:
        switched on (or off for the base); several: peft's mixed-adapter batch (`adapter_names`)."""
        model, first = self.model, jobs[0]
        adapters = {j.route.adapter for j in jobs}
        extra: dict = {}
        adapter_ctx = nullcontext()
        if len(adapters) > 1:
            extra["adapter_names"] = [j.route.adapter or "__base__" for j in jobs]
        elif (adapter := adapters.pop()) is not None:
            model.set_adapter(adapter)
        elif isinstance(model, PeftModel):
            adapter_ctx = model.disable_adapter()
        pad = first.route.pad_token_id
        width = max(len(j.input_ids) for j in jobs)
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)  # (batch, prompt), padded on the left
        mask = torch.zeros_like(ids)
        for i, j in enumerate(jobs):
            ids[i, width - len(j.input_ids):] = torch.tensor(j.input_ids)
            mask[i, width - len(j.input_ids):] = 1
        rows = _Rows(jobs)
        kwargs = dict(max_new_tokens=max(j.max_new_tokens for j in jobs), eos_token_id=first.route.stop_token_ids,
                      pad_token_id=pad, do_sample=first.temperature >= GREEDY_BELOW)
        if kwargs["do_sample"]:
            kwargs.update(temperature=first.temperature, top_p=first.top_p, top_k=None)
            if first.seed is not None:
                torch.manual_seed(first.seed)  # one worker, a seeded job alone: the global generator is ours
        autocast = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None
                    else nullcontext())
        with adapter_ctx, autocast:
            model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), streamer=rows,
                           stopping_criteria=StoppingCriteriaList([rows]), **kwargs, **extra)
        return [rows.result(i) for i in range(len(jobs))]

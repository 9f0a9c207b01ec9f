"""Benchmarks through lm-evaluation-harness, on the model already in memory (adapter applied, or switched off).

lm-eval builds the requests (prompt, few-shot context, the choices), tokenizes them, and computes acc/acc_norm;
medtune hands it its loaded model through `MedtuneLM`, a subclass of lm-eval's `HFLM` whose only change is how the
log-likelihoods of a batch are computed. Faster than `lm_eval --model hf --model_args pretrained=DIR` (see
`medtune bench eval`), same numbers, because:
  - the model object comes in bf16 where the CPU has fast bf16 (HFLM loads the checkpoint's dtype, fp32 here);
  - batches of 16 (lm-eval's default batch size is 1);
  - `torch.inference_mode()` instead of `no_grad()`;
  - the output layer runs only at the continuation's positions (1 token per choice here) instead of at every
    position of every row, and no (batch, length, vocab) log-softmax is materialised: for SmolLM2 the 49k-word
    output layer is ~20% of the FLOPs per token, and its fp32 logits of a 16 x 400-token batch would be 1.3 GB.
  Requests stay sorted longest-first and grouped by shared context (lm-eval's `Collator`, as HFLM does), so a
  question whose choices are single tokens costs one forward pass, and padding is small.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medtune.data.benchmark_files import Subset, read_benchmark
from medtune.errors import MedtuneError
from medtune.eval.benchmarks import write_tasks
from medtune.eval.calibration import ece, item_calibration
from medtune.generate import Loaded

log = logging.getLogger("medtune")
DEFAULT_BATCH = 16


@dataclass
class BenchmarkResult:
    task: str
    metrics: dict[str, float]  # acc, acc_stderr, acc_norm, acc_norm_stderr, ece, brier, n
    items: list[dict] = field(default_factory=list)  # per item: id, subtask, acc, acc_norm, confidence, brier
    subtasks: dict[str, dict[str, float]] = field(default_factory=dict)


def _lm_class():
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import Collator

    class MedtuneLM(HFLM):
        """HFLM on a model object; log-likelihoods computed at the continuation positions only (see module doc)."""

        @torch.inference_mode()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            model = self.model
            decoder, head = model.get_decoder(), model.get_output_embeddings()
            re_ord = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                              group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
            bar = tqdm(total=len(requests), desc=getattr(self, "bar_desc", "scoring"), unit="req", disable=disable_tqdm, dynamic_ncols=True)
            res = []
            for chunk in re_ord.get_batched(n=override_bs or self.batch_size):
                # As HFLM: context + continuation minus its last token, left-truncated to the model's length.
                rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
                width = max(len(r) for r in rows)
                ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T), right-padded: causal, so the
                for b, r in enumerate(rows):                               # padding never reaches a real position
                    ids[b, : len(r)] = torch.tensor(r)
                hidden = decoder(input_ids=ids.to(self.device), use_cache=False).last_hidden_state  # (B, T, H)
                for b, ((req, ctx, cont), r) in enumerate(zip(chunk, rows, strict=True)):
                    h = hidden[b, len(r) - len(cont): len(r)]  # (C, H): the positions that predict the continuation
                    logprobs = torch.log_softmax(head(h).float(), dim=-1)[None]  # (1, C, V)
                    greedy = logprobs.argmax(-1)  # (1, C)
                    for req_str, cont_toks, lp in re_ord.get_cache(req_str=req, cxt_toks=ctx, cont_toks=cont,
                                                                   logits=logprobs):
                        target = torch.tensor(cont_toks, device=lp.device)[None]  # (1, c)
                        exact = bool((greedy[:, -target.shape[1]:] == target).all())
                        answer = (float(lp[:, -target.shape[1]:].gather(2, target[..., None]).sum()), exact)
                        res.append(answer)
                        if req_str is not None:
                            self.cache_hook.add_partial("loglikelihood", req_str, answer)
                        bar.update(1)
            bar.close()
            return re_ord.get_original(res)

    return MedtuneLM


def make_lm(loaded: Loaded, batch_size: int = DEFAULT_BATCH):
    """lm-eval's view of a loaded model (an `HFLM` subclass around the same object)."""
    return _lm_class()(pretrained=loaded.model, tokenizer=loaded.tok, batch_size=batch_size)


def offline_env() -> None:
    """lm-eval and datasets must never reach for the hub: the task files are local."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prepare_tasks(task: str, data: str | Path, folder: Path, *, limit: int | None = None, fewshot: int = 0,
                  fewshot_data: str | Path | None = None) -> tuple[list[str], list[Subset]]:
    """Read and check the benchmark (and shots), write lm-eval task YAMLs into folder; returns names and subsets."""
    subsets = read_benchmark(task, data)
    if limit:
        subsets = [Subset(s.name, s.description, s.items[:limit]) for s in subsets]
    shots = None
    if fewshot:
        if fewshot_data is None:
            raise MedtuneError("--fewshot needs --fewshot-data: a separate file (MMLU: folder) of the same layout "
                               "to take the shots from", field="--fewshot-data")
        shots = read_benchmark(task, fewshot_data)
        for s in shots:
            if len(s.items) < fewshot:
                raise MedtuneError(f"{len(s.items)} shots for {s.name}, fewer than --fewshot {fewshot}",
                                   file=str(fewshot_data), field="--fewshot-data")
        missing = {s.name for s in subsets} - {s.name for s in shots}
        if missing:
            raise MedtuneError(f"no shots for {', '.join(sorted(missing))}", file=str(fewshot_data),
                               field="--fewshot-data")
    return write_tasks(subsets, folder, shots), subsets


def run_benchmark(loaded: Loaded, task: str, data: str | Path, *, fewshot: int = 0,
                  fewshot_data: str | Path | None = None, limit: int | None = None, batch_size: int = DEFAULT_BATCH,
                  use_adapter: bool = True, lm=None) -> BenchmarkResult:
    """Score one benchmark by log-likelihood with lm-eval; per-item acc/acc_norm kept for the paired bootstrap."""
    offline_env()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="medtune-eval-") as tmp:
        names, subsets = prepare_tasks(task, data, Path(tmp), limit=limit, fewshot=fewshot, fewshot_data=fewshot_data)
        lm = lm or make_lm(loaded, batch_size)
        lm.bar_desc = loaded.label(f"scoring {task}", use_adapter)  # one lm serves base and tuned: name this pass
        adapter_off = loaded.model.disable_adapter() if (loaded.has_adapter and not use_adapter) else nullcontext()
        with adapter_off:
            out = simple_evaluate(model=lm, tasks=names, num_fewshot=fewshot,
                                  task_manager=TaskManager(include_path=tmp, include_defaults=False),
                                  log_samples=True, bootstrap_iters=0)
    return collect(task, out, subsets)


def collect(task: str, out: dict, subsets: list[Subset]) -> BenchmarkResult:
    """lm-eval's output → per-item rows (in file order) and item-weighted metrics over all subtasks (MMLU: the
    micro average, as lm-eval's `multimedqa` group with weight_by_size)."""
    items, subtasks = [], {}
    for subset in subsets:
        samples = sorted(out["samples"][subset.name], key=lambda s: s["doc_id"])
        rows = []
        for s in samples:
            item = subset.items[s["doc_id"]]
            confidence, brier = item_calibration([r[0] for r in s["filtered_resps"]], item.gold)
            rows.append({"id": item.id, "subtask": subset.name, "acc": float(s["acc"]), "acc_norm": float(s["acc_norm"]),
                         "confidence": confidence, "brier": brier})
        items += rows
        subtasks[subset.name] = summarize(rows)
    return BenchmarkResult(task, summarize(items), items, subtasks if len(subsets) > 1 else {})


def summarize(rows: list[dict]) -> dict[str, float]:
    """Mean and standard error (lm-eval's `mean_stderr`: sample std / sqrt(n)) of acc and acc_norm; ECE and Brier
    (see medtune.eval.calibration)."""
    from lm_eval.api.metrics import mean_stderr

    out: dict[str, float] = {}
    for metric in ("acc", "acc_norm"):
        values = [r[metric] for r in rows]
        out[metric] = sum(values) / len(values)
        out[f"{metric}_stderr"] = mean_stderr(values) if len(values) > 1 else float("nan")
    out["ece"] = ece([r["confidence"] for r in rows], [r["acc"] for r in rows])
    out["brier"] = sum(r["brier"] for r in rows) / len(rows)
    out["n"] = len(rows)
    return out

"""`medtune bench generate`: answer speed of medtune's `generate` next to the seed notebooks' transformers pipeline.

Both systems answer the same medical prompts, greedily, up to the same number of new tokens, each in its OWN
subprocess (`python -m medtune.bench.generate_speed --worker SYSTEM --config JSON`), one after another:

  pipeline  what seed 001 does after training: `transformers.pipeline("text-generation")` on the model as
            loaded by default (fp32 on CPU), the prompt in the model's chat template.
  medtune   `medtune.generate.generate` on `load_for_inference` as `medtune generate` loads it (bf16 where the CPU
            has fast bf16; else fp32 with bf16 copies for one-token steps: medtune.decode_weights), the run's or
            model's chat template and stop tokens.
  gguf      the same `generate` on the model's GGUF export (`medtune export --format gguf`, f16 unless
            --gguf-quant; or --gguf FILE): llama.cpp, medtune's shipping path (`medtune generate/chat/serve
            FILE.gguf`). Not run by default: it needs medtune[gguf] and, without --gguf, an export (~30 s for 135M).

For each prompt: time to first token (TTFT: from the call to the first new token reaching the streamer) and total
time; tokens/s = new tokens / total time, decode tokens/s = (new tokens - 1) / (total - TTFT). The first prompt
is answered once before timing (warm-up). Both stop at the template's end-of-turn token, so the number of new
tokens can differ a little between systems: the table shows it.
"""

from __future__ import annotations

import logging
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from medtune.bench.harness import machine_info, run_worker_process, system_rows, worker_main, write_json
from medtune.errors import MedtuneError
from medtune.recipe import DEFAULT_MODEL

log = logging.getLogger("medtune")

SYSTEMS = ("pipeline", "medtune", "gguf")
DEFAULT_SYSTEMS = ("pipeline", "medtune")
PROMPTS = (
    "Please tell me about Bursitis.",
    "Explain in detail how type 2 diabetes is diagnosed and treated.",
    "What are the warning signs of a stroke, and what should someone do?",
    "Describe the difference between a viral and a bacterial infection.",
    "How does high blood pressure damage the body over time?",
)


class _TokenClock:
    """A generate() streamer that counts new tokens and notes when the first arrives (the first put is the prompt)."""

    def __init__(self):
        self.prompt_seen, self.tokens, self.first = False, 0, None

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.first is None:
            self.first = time.perf_counter()
        self.tokens += value.numel()

    def end(self) -> None:
        pass


def _timed(call) -> tuple[int, float, float]:
    """(new tokens, time to first token, total time) of one generate-like call that takes a streamer."""
    clock = _TokenClock()
    start = time.perf_counter()
    call(clock)
    total = time.perf_counter() - start
    return clock.tokens, (clock.first or start + total) - start, total


def run_worker(system: str, cfg: dict) -> dict:
    import torch

    prompts, n = cfg["prompts"], cfg["max_new_tokens"]
    if system == "pipeline":
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
        if tok.chat_template is None:  # a plain model: the same template medtune would pick, so prompts match
            from medtune.recipe import TokenizerConfig
            from medtune.tokenizer import prepare_tokenizer

            prepare_tokenizer(tok, TokenizerConfig())
        model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], use_safetensors=True)
        pipe = pipeline("text-generation", model=model, tokenizer=tok)

        def answer(prompt: str) -> tuple[int, float, float]:
            return _timed(lambda clock: pipe([{"role": "user", "content": prompt}], max_new_tokens=n,
                                             do_sample=False, streamer=clock, return_full_text=False))

        dtype = str(next(model.parameters()).dtype)
    elif system == "gguf":
        from medtune.generate import generate, load_for_inference, user_turn

        loaded = load_for_inference(cfg["gguf"])
        clock: list = []  # the _TokenClock of the call in progress: llama.cpp's tokens reach it one by one
        llama_tokens = loaded.model.tokens

        def counted(*args, **kwargs):
            for token in llama_tokens(*args, **kwargs):
                if clock[-1].tokens < n:  # llama.cpp yields one token past the budget before the loop stops
                    clock[-1].put(torch.tensor([token]))
                yield token

        loaded.model.tokens = counted

        def answer(prompt: str) -> tuple[int, float, float]:
            def call(c):
                clock.append(c)
                c.put(None)  # the prompt (transformers' streamers see it first)
                generate(loaded, user_turn(prompt), max_new_tokens=n, repetition_penalty=1.0)
            return _timed(call)

        dtype = f"gguf {cfg.get('gguf_quant') or Path(cfg['gguf']).stem}"
    else:
        from medtune.decode_weights import DecodeLinear
        from medtune.generate import generate, load_for_inference, user_turn

        loaded = load_for_inference(cfg["model_dir"], for_decoding=True)  # as `medtune generate` loads it

        def answer(prompt: str) -> tuple[int, float, float]:
            return _timed(lambda clock: generate(loaded, user_turn(prompt), max_new_tokens=n, streamer=clock,
                                                         repetition_penalty=1.0, no_repeat_ngram_size=0))

        dtype = str(loaded.autocast or next(loaded.model.parameters()).dtype)
        if any(isinstance(m, DecodeLinear) for m in loaded.model.modules()):
            dtype += " (bf16 steps)"  # one-token steps multiply by bf16 copies (medtune.decode_weights)
    answer(prompts[0])  # warm-up
    runs = []
    for prompt in prompts:
        tokens, ttft, total = answer(prompt)
        runs.append({"tokens": tokens, "ttft_s": ttft, "total_s": total})
    return {"runs": runs, "dtype": dtype, "threads": torch.get_num_threads()}


def summarize(runs: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in runs)
    total = sum(r["total_s"] for r in runs)
    decode = sum(r["total_s"] - r["ttft_s"] for r in runs)
    return {"new_tokens": tokens, "tokens_per_s": tokens / total if total else float("nan"),
            "decode_tokens_per_s": sum(max(r["tokens"] - 1, 0) for r in runs) / decode if decode else float("nan"),
            "ttft_ms_median": 1000 * statistics.median(r["ttft_s"] for r in runs)}


def run_bench(*, model: str = DEFAULT_MODEL, max_new_tokens: int = 128, prompts: tuple[str, ...] = PROMPTS,
              systems: tuple[str, ...] = DEFAULT_SYSTEMS, gguf: str | None = None, gguf_quant: str = "f16",
              json_path=None, command: str | None = None, timeout: float | None = None) -> dict:
    """`gguf`: the GGUF file the gguf system runs (default: `model` exported at `gguf_quant` into a temporary
    folder)."""
    from medtune.models import resolve_model
    from medtune.run.meta import is_run_dir

    if max_new_tokens < 2:
        raise MedtuneError("must be at least 2", field="--max-new-tokens")
    if is_run_dir(model) and "pipeline" in systems:
        raise MedtuneError("the pipeline baseline needs a plain model; give a model name or folder", file=model)
    if gguf and not Path(gguf).is_file():
        raise MedtuneError("GGUF file not found", file=gguf, field="--gguf")
    model_dir = model if is_run_dir(model) else resolve_model(model)
    cfg = {"model_dir": model_dir, "prompts": list(prompts), "max_new_tokens": max_new_tokens}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="medtune-bench-gguf-") as tmp:
        for system in systems:
            if system == "gguf":
                cfg.update(gguf=gguf or export_for_bench(model, Path(tmp), gguf_quant),
                           gguf_quant=None if gguf else gguf_quant)
            log.info("bench generate: %s ...", system)
            res = run_worker_process("medtune.bench.generate_speed", cfg, system=system, timeout=timeout)
            if not res.get("error"):
                res.update(summarize(res["runs"]))
            results[system] = res
    result = {"systems": results, "config": {**cfg, "model": model, "systems": list(systems)},
              "machine": machine_info(), "command": command or shlex.join(sys.argv)}
    result.update(ratios(results))
    write_json(json_path, result)
    return result


def export_for_bench(model: str, folder: Path, quant: str) -> str:
    """`model` (a name, folder or run) as a GGUF in `folder`, by `medtune export`'s code."""
    from medtune.export.gguf import export_gguf

    out = folder / f"model-{quant}.gguf"
    log.info("bench generate: exporting %s to GGUF (%s) for the gguf system ...", model, quant)
    export_gguf(model, out, quant)
    return str(out)


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """tokens/s and time-to-first-token ratios of medtune's systems to the pipeline's."""
    ok = {k: v for k, v in results.items() if not v.get("error")}
    out = {}
    for system, prefix in (("medtune", ""), ("gguf", "gguf_")):
        if "pipeline" in ok and system in ok:
            out[f"{prefix}speedup_tokens_per_s"] = ok[system]["tokens_per_s"] / ok["pipeline"]["tokens_per_s"]
            out[f"{prefix}ttft_ratio"] = ok[system]["ttft_ms_median"] / ok["pipeline"]["ttft_ms_median"]
    return out


def format_table(result: dict) -> str:
    c = result["config"]
    head = f"{'system':<9} {'dtype':<28} {'new tokens':>10} {'tokens/s':>9} {'decode tok/s':>12} {'TTFT ms':>8} {'peak RSS MB':>11}"
    lines = [f"medtune bench generate: {c['model']} | {len(c['prompts'])} prompts, greedy, up to "
             f"{c['max_new_tokens']} new tokens", "", *system_rows(result["systems"], head, 9, lambda name, s: (
                 f"{name:<9} {s['dtype']:<28} {s['new_tokens']:>10} {s['tokens_per_s']:9.1f} "
                 f"{s['decode_tokens_per_s']:12.1f} {s['ttft_ms_median']:8.0f} {s['peak_rss_mb']:11.0f}"))]
    for system, prefix in (("medtune", ""), ("gguf", "gguf_")):
        if f"{prefix}speedup_tokens_per_s" in result:
            lines += ["", f"tokens/s: {system}/pipeline {result[f'{prefix}speedup_tokens_per_s']:.2f}x; "
                      f"time to first token: {system}/pipeline {result[f'{prefix}ttft_ratio']:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, run_worker, prog="python -m medtune.bench.generate_speed",
                       description="One `medtune bench generate` worker.", systems=SYSTEMS)


if __name__ == "__main__":
    sys.exit(main())

"""`medtune bench train`: the seed recipe, TRL's fastest CPU setup and medtune, one command, one run, side by side.

Every system trains the same model on the same texts for the same number of optimizer steps, each in its OWN
subprocess (`python -m medtune.bench.train_speed --worker SYSTEM --config JSON`), one after another, so that peak RSS
is per system and no system inherits another's allocator, thread pool or imports. Each worker prints one JSON line
(its last stdout line): per-step tokens, seconds and loss, its peak RSS and how it was set up. This process turns
those into tokens/s, loss and MFU, prints a table and, with `--json FILE`, writes everything.

  seed     the seed notebooks' recipe through TRL `SFTTrainer`: fp32, padded batches grouped by length,
           gradient checkpointing, LoRA r=64 alpha=16 dropout=0.1 on q/k/v/o, batch 4, max_length 512, lr 2e-4.
  trl      TRL's fastest CPU setup we know: packing (best-fit decreasing) + padding-free batches, bf16 autocast
           where the CPU has fast bf16 (else fp32: bf16 would run on a reference kernel),
           no gradient checkpointing; same LoRA shape and batch settings.
  medtune  `medtune.train.job.run_training` with the same LoRA shape, batch, length and lr, otherwise medtune's
           defaults (precision auto, ...): whatever the owned loop does by default is what is measured, including
           the caching allocator `medtune train` preloads when one is installed (`setup.allocator`).
  qlora    the same medtune run on a 4-bit base (bitsandbytes NF4, double quantisation): QLoRA's speed and memory
           next to LoRA's (`qlora_vs_lora` in the results).

Data: rows of ../shared/data/train/medical_terms.jsonl (or --data, else demo:terms) formatted as the seed does,
`<s>[INST] Please tell me about {page_title} [/INST] {page_text} </s>`, with the tokenizer's own bos/eos strings in
place of <s>/</s>. A seeded sample of steps x batch_size rows is written ONCE to a temp .jsonl `text` file that
all three read: a system that batches by example trains on exactly that sample, once (one epoch = the run); a
system that packs (TRL here; medtune with train.packing) fits ~2 texts into a 512-token row, so it goes round
the same sample ~2 times in the same number of steps. Each text trains on all of its tokens and is truncated at
max_length by each system.

Measures: useful tokens/s = non-pad tokens / wall time of the steps after the first 2 (warm-up); peak RSS of the
worker; token-weighted mean loss over the last 25% of steps, and the loss at equal tokens (the steps where the cumulative token
count is in the last quarter of the smallest system's total, where every system has seen each text once); wall
time of the worker; MFU = tokens/s x 4 x base parameters / the matmul peak measured on the spot before and after
the workers, the higher of the two kept (bf16 and fp32; `medtune.bench.peak`); the table shows it against the peak
of the precision each run trained in (fp32 on a CPU without fast bf16, where medtune's `precision: auto` trains
in fp32), the JSON both.

Threads: workers keep torch's default (one per core; OMP_NUM_THREADS is respected if set) and nothing else.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from medtune.bench.harness import (
    fmt,
    machine_info,
    parse_systems,
    run_subprocess,
    run_worker_process,
    system_rows,
    worker_env,
    worker_main,
    write_json,
)
from medtune.errors import MedtuneError
from medtune.recipe import DEFAULT_MODEL
from medtune.run.layout import METRICS
from medtune.train.allocator import allocator_for_training, preloaded_allocator

log = logging.getLogger("medtune")

SYSTEMS = ("seed", "trl", "medtune", "qlora")
DEFAULT_STEPS = 30
QUICK_STEPS = 8
DEFAULT_MAX_LENGTH = 512
QUICK_MAX_LENGTH = 256
WARMUP_STEPS = 2  # optimizer steps left out of tokens/s
LOSS_TAIL = 0.25  # share of the last steps whose mean loss is reported
SHARED_DATA = Path("..") / "shared" / "data" / "train" / "medical_terms.jsonl"
FALLBACK_DATA = "demo:terms"
PROMPT = "Please tell me about {title}"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class BenchConfig:
    model: str = DEFAULT_MODEL
    data: str | None = None  # None: ../shared/data/train/medical_terms.jsonl, else demo:terms
    steps: int = DEFAULT_STEPS
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = 4
    systems: tuple[str, ...] = SYSTEMS
    lr: float = 2e-4
    lora_r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = TARGET_MODULES
    seed: int = 42
    peak_seconds: float = 1.0  # timed budget per dtype of the matmul peak
    timeout: float | None = None  # per worker, seconds


def bench_config(*, steps: int | None = None, model: str | None = None, data: str | None = None, quick: bool = False,
                 max_length: int | None = None, batch_size: int = 4, systems: str | None = None) -> BenchConfig:
    """The CLI's flags → a validated config. --quick means 8 steps at max_length 256 unless those are given."""
    chosen = parse_systems(systems, SYSTEMS) if systems else SYSTEMS
    cfg = BenchConfig(model=model or DEFAULT_MODEL, data=data,
                      steps=steps if steps is not None else (QUICK_STEPS if quick else DEFAULT_STEPS),
                      max_length=max_length if max_length is not None else (QUICK_MAX_LENGTH if quick else DEFAULT_MAX_LENGTH),
                      batch_size=batch_size, systems=chosen)
    validate(cfg)
    return cfg


def validate(cfg: BenchConfig) -> None:
    if cfg.steps <= WARMUP_STEPS:
        raise MedtuneError(f"must be at least {WARMUP_STEPS + 1} (the first {WARMUP_STEPS} steps are warm-up)",
                           field="--steps")
    if cfg.max_length < 16:
        raise MedtuneError("must be at least 16", field="--max-length")
    if cfg.batch_size < 1:
        raise MedtuneError("must be at least 1", field="--batch-size")
    trl_systems = [s for s in cfg.systems if s in ("seed", "trl")]
    if trl_systems and importlib.util.find_spec("trl") is None:
        raise MedtuneError(f"the {' and '.join(trl_systems)} systems train with TRL: pip install 'medtune[bench]' "
                           "(or --systems medtune,qlora)", field="--systems")


# ---- data -----------------------------------------------------------------------------------------------------

def find_data(spec: str | None) -> str:
    """--data as given; else the shared medical terms next to the repo (or the cwd); else demo:terms."""
    if spec:
        return spec
    repo = Path(__file__).resolve().parents[3]  # src/medtune/bench/train_speed.py → repo root (src layout)
    for base in (repo, Path.cwd()):
        candidate = (base / SHARED_DATA).resolve()
        if candidate.is_file():
            return str(candidate)
    return FALLBACK_DATA


def format_text(title: str, body: str, bos: str, eos: str) -> str:
    """The seed's Llama-2 text, `<s>[INST] Please tell me about X [/INST] body </s>`, with this tokenizer's strings."""
    return f"{bos}[INST] {PROMPT.format(title=title.strip())} [/INST] {body.strip()} {eos}".strip()


def special_strings(tok) -> tuple[str, str]:
    """(bos, eos) strings to write into the text. When the tokenizer puts bos in front by itself (LLaMA-style), the
    text leaves it out: TRL tokenizes with special tokens and medtune adds them when the text lacks bos, so both
    then get exactly one bos, as the model was trained with."""
    bos = tok.bos_token or ""
    if bos and tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
        bos = ""
    return bos, tok.eos_token or ""


def row_text(data: dict, bos: str, eos: str) -> str | None:
    title, body = data.get("page_title"), data.get("page_text")
    if isinstance(title, str) and isinstance(body, str) and title.strip() and body.strip():
        return format_text(title, body, bos, eos)
    text = data.get("text")
    return text if isinstance(text, str) and text.strip() else None


def build_texts(spec: str, tok, n: int, seed: int = 0) -> list[str]:
    """A seeded sample of n rows (all rows when there are fewer), formatted as the seed does."""
    from medtune.data.readers import read_rows

    rows = read_rows(spec)
    bos, eos = special_strings(tok)
    texts = [t for r in rows if (t := row_text(r.data, bos, eos)) is not None]
    if not texts:
        raise MedtuneError("no rows with page_title and page_text (or text) to benchmark on", file=spec, field="--data")
    if len(texts) > n:
        texts = random.Random(seed).sample(texts, n)
    return texts


def write_texts(texts: list[str], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return path


# ---- arithmetic -----------------------------------------------------------------------------------------------

def count_base_params(model_dir: str) -> int:
    """Parameters of the base model (a tied embedding/LM head counted once), built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


def flops_per_token(base_params: int) -> float:
    """LoRA training FLOPs per token: forward 2N + backward through the frozen weights 2N (no weight gradients).
    Recomputation (gradient checkpointing) is not useful work and is not counted."""
    return 4.0 * base_params


def mfu(tokens_per_s: float, flops_per_tok: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation, as a fraction of the measured peak."""
    if not peak_tflops or not math.isfinite(tokens_per_s):
        return float("nan")
    return tokens_per_s * flops_per_tok / (peak_tflops * 1e12)


def summarize_steps(steps: list[dict], warmup: int = WARMUP_STEPS, tail: float = LOSS_TAIL) -> dict:
    """Per-step {tokens, seconds, loss} → tokens/s after warm-up, tokens/step, and the token-weighted mean loss of
    the last `tail` share of the steps."""
    if not steps:
        raise ValueError("no steps recorded")
    measured = steps[warmup:] if len(steps) > warmup else steps
    seconds = sum(s["seconds"] for s in measured)
    k = max(1, math.ceil(len(steps) * tail))
    total = sum(s["tokens"] for s in steps)
    rates = sorted(s["tokens"] / s["seconds"] for s in measured if s["seconds"] > 0)
    return {"tokens_per_s": sum(s["tokens"] for s in measured) / seconds if seconds > 0 else float("nan"),
            # robust to a step slowed down by something else on the machine (not in the table; see `loadavg`)
            "tokens_per_s_median": statistics.median(rates) if rates else float("nan"),
            "tokens_per_step": total / len(steps), "tokens_total": total, "measured_steps": len(measured),
            "train_s": sum(s["seconds"] for s in steps),
            "loss": token_mean(steps[-k:])}


def token_mean(steps: list[dict]) -> float:
    """Token-weighted mean loss of these steps (each step's loss is already a mean over its tokens), so a short
    last step of an epoch does not weigh as much as a full one."""
    pairs = [(s["loss"], s["tokens"]) for s in steps if s.get("loss") is not None and s["tokens"] > 0]
    tokens = sum(n for _, n in pairs)
    return sum(loss * n for loss, n in pairs) / tokens if tokens else float("nan")


def loss_at_tokens(steps: list[dict], budget: float, tail: float = LOSS_TAIL) -> float:
    """Token-weighted mean loss of the steps whose cumulative token count lies in the last `tail` share of `budget`
    tokens (at least the first step that reaches the window), so systems with different tokens/step compare at
    equal tokens."""
    lo = budget * (1 - tail)
    cum, window, first_past = 0, [], None
    for s in steps:
        cum += s["tokens"]
        if s.get("loss") is None:
            continue
        if lo < cum <= budget:
            window.append(s)
        if cum > lo and first_past is None:
            first_past = s
    if not window and first_past is not None:
        window = [first_past]
    return token_mean(window)


# ---- workers (run in their own process) -----------------------------------------------------------------------


def _sampling_kwargs(config_cls) -> dict:
    """Group-by-length for the seed: `train_sampling_strategy` in transformers 5, `group_by_length` before."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length"}
    if "group_by_length" in names:
        return {"group_by_length": True}
    return {}


def _trl_worker(system: str, cfg: dict) -> dict:
    import dataclasses
    from collections import deque

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from medtune.models import bf16_supported

    seed_recipe = system == "seed"
    work = Path(cfg["workdir"])
    tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
    if seed_recipe:  # what the notebooks do
        tok.pad_token = tok.eos_token
        tok.padding_side = "right"
    dataset = load_dataset("json", data_files=cfg["data_file"], split="train", cache_dir=str(work / f"hf-{system}"))
    lora = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=list(cfg["target_modules"]), bias="none", task_type="CAUSAL_LM")
    common = dict(output_dir=str(work / f"{system}-out"), max_steps=cfg["steps"],
                  per_device_train_batch_size=cfg["batch_size"], gradient_accumulation_steps=1,
                  learning_rate=cfg["lr"], optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no",
                  report_to=[], seed=cfg["seed"], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                  max_length=cfg["max_length"], dataset_text_field="text", model_init_kwargs={"dtype": "float32"})
    if seed_recipe:
        sampling = _sampling_kwargs(SFTConfig)
        args = SFTConfig(**common, bf16=False, gradient_checkpointing=True, packing=False, **sampling)
        setup = {"precision": "fp32", "batches": "padded", "sampling": next(iter(sampling.values()), "random"),
                 "gradient_checkpointing": True}
    else:
        fast_bf16 = bf16_supported(torch.device("cpu"))  # on a CPU without fast bf16, fp32 is TRL's fastest
        args = SFTConfig(**common, bf16=fast_bf16, gradient_checkpointing=False, packing=True, packing_strategy="bfd",
                         padding_free=True)
        setup = {"precision": "bf16 autocast (fp32 weights)" if fast_bf16 else "fp32", "batches": "packed bfd, padding-free",
                 "sampling": "random", "gradient_checkpointing": False}
    setup["attn_implementation"] = "sdpa (transformers default)"

    counts: deque[int] = deque()  # non-pad tokens of each collated batch, in order (the dataloader prefetches)
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        """Step k takes from the end of step k-1 (the start of step 1) to its own end: data, compute, optimizer."""

        def __init__(self):
            self.begin = self.last_end = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            start = self.last_end if self.last_end is not None else self.begin
            tokens = sum(counts.popleft() for _ in range(args.gradient_accumulation_steps) if counts)
            steps.append({"step": state.global_step, "tokens": tokens, "seconds": now - start,
                          "compute_seconds": now - self.begin, "loss": None})
            self.last_end = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and steps and steps[-1]["step"] == state.global_step:
                steps[-1]["loss"] = float(logs["loss"])

    trainer = SFTTrainer(model=cfg["model_dir"], args=args, train_dataset=dataset, processing_class=tok,
                         peft_config=lora, callbacks=[StepTimer()])
    inner = trainer.data_collator

    def counting_collator(examples):
        batch = inner(examples)
        mask = batch.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    # TRL refuses a custom collator with padding-free, so wrap its own after construction.
    trainer.data_collator = counting_collator
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return {"steps": steps, "setup": setup, "trainable_params": trainable, "threads": torch.get_num_threads(),
            "train_rows": len(trainer.train_dataset),
            "sft_config": {k: v for k, v in dataclasses.asdict(args).items()
                           if k in ("bf16", "gradient_checkpointing", "packing", "packing_strategy", "padding_free",
                                    "train_sampling_strategy", "group_by_length", "optim", "max_length")}}


def _medtune_worker(cfg: dict, quantized: bool = False) -> dict:
    import torch

    from medtune.models import bf16_supported, pick_device
    from medtune.recipe import load_recipe
    from medtune.train.job import run_training

    out = Path(cfg["workdir"]) / "medtune-run"
    overrides = [f"model={cfg['model_dir']}", f"data.path={cfg['data_file']}", "data.format=text",
                 "data.eval_ratio=0", f"data.max_length={cfg['max_length']}", f"train.batch_size={cfg['batch_size']}",
                 "train.grad_accum=1", f"train.max_steps={cfg['steps']}", f"train.lr={cfg['lr']}",
                 f"train.seed={cfg['seed']}", f"lora.r={cfg['lora_r']}", f"lora.alpha={cfg['lora_alpha']}",
                 f"lora.dropout={cfg['lora_dropout']}", f"lora.target_modules=[{', '.join(cfg['target_modules'])}]",
                 "train.eval_before=false", "train.logging_steps=1", "samples.prompts=[]", f"output_dir={out}"]
    if quantized:
        overrides += ["quant.load_in_4bit=true", "quant.quant_type=nf4", "quant.double_quant=true"]
    recipe = load_recipe(None, overrides)
    result = run_training(recipe)
    steps = medtune_steps(result.run_dir / METRICS)
    precision, device = recipe.train.precision, pick_device(recipe.train.device)
    if precision == "auto":
        precision = "auto → " + ("bf16" if bf16_supported(device) else "fp32")
    t = recipe.train
    setup = {"precision": precision, "device": device.type, "batches": "packed" if t.packing else "padded",
             "sampling": "group_by_length" if t.group_by_length else "random",
             "gradient_checkpointing": t.gradient_checkpointing, "attn_implementation": recipe.attn_implementation,
             "optimizer": t.optimizer, "base": "4-bit NF4" if quantized else "bf16/fp32",
             "allocator": Path(preloaded_allocator() or "system (glibc)").name}
    return {"steps": steps, "setup": setup, "threads": torch.get_num_threads(), "overrides": overrides}


def medtune_steps(metrics_file: Path) -> list[dict]:
    """Per-step tokens/seconds/loss from a run's metrics.jsonl logged every step (`tokens_seen`, `tokens_per_s`)."""
    steps, seen = [], 0
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line) if line.strip() else {}
        if "loss" not in rec or "tokens_per_s" not in rec:
            continue
        if "tokens_seen" not in rec:
            raise RuntimeError(f"{metrics_file} has no tokens_seen: the training loop's metrics changed")
        tokens = int(rec["tokens_seen"]) - seen
        seen = int(rec["tokens_seen"])
        steps.append({"step": int(rec["step"]), "tokens": tokens,
                      "seconds": tokens / rec["tokens_per_s"] if rec["tokens_per_s"] else float("nan"),
                      "loss": float(rec["loss"])})
    return steps


def run_worker(system: str, cfg: dict) -> dict:
    if system in ("medtune", "qlora"):
        return _medtune_worker(cfg, quantized=system == "qlora")
    return _trl_worker(system, cfg)


# ---- the harness ------------------------------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, *, json_path: str | Path | None = None, command: str | None = None) -> dict:
    """Run every chosen system in its own subprocess, one after another; return (and optionally write) the results."""
    # SIGTERM becomes SystemExit, so the running worker is killed (subprocess.run does that on any exception)
    # and the temp dir removed, instead of leaving an orphan worker training on a busy machine.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run_bench(cfg, json_path=json_path, command=command)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _run_bench(cfg: BenchConfig, *, json_path: str | Path | None, command: str | None) -> dict:
    from transformers import AutoTokenizer

    from medtune.models import resolve_model

    validate(cfg)
    model_dir = resolve_model(cfg.model)
    data_spec = find_data(cfg.data)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = build_texts(data_spec, tok, cfg.steps * cfg.batch_size, seed=0)
    base_params = count_base_params(model_dir)
    env = worker_env()
    stream = log.isEnabledFor(logging.DEBUG)
    load_before = os.getloadavg()
    systems: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp:
        data_file = write_texts(texts, Path(tmp) / "texts.jsonl")
        log.info("bench: %s (%s base parameters), %d texts from %s, %d steps x batch %d, max_length %d",
                 cfg.model, f"{base_params:,}", len(texts), data_spec, cfg.steps, cfg.batch_size, cfg.max_length)
        peak_cmd = [sys.executable, "-m", "medtune.bench.peak", "--seconds", str(cfg.peak_seconds)]
        peaks = [run_subprocess(peak_cmd, env=env, timeout=cfg.timeout, stream=stream)[0]]
        log.info("bench: matmul peak bf16 %.3f TFLOP/s, fp32 %.3f TFLOP/s%s", peaks[0].get("bf16_tflops", float("nan")),
                 peaks[0].get("fp32_tflops", float("nan")),
                 f"; GPU bf16 {peaks[0]['cuda_bf16_tflops']:.1f}" if peaks[0].get("cuda_bf16_tflops") else "")
        worker_cfg = {"model_dir": model_dir, "data_file": str(data_file), "steps": cfg.steps,
                      "max_length": cfg.max_length, "batch_size": cfg.batch_size, "lr": cfg.lr, "lora_r": cfg.lora_r,
                      "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                      "target_modules": list(cfg.target_modules), "seed": cfg.seed}
        for i, system in enumerate(cfg.systems, 1):
            work = Path(tmp) / system
            work.mkdir()
            log.info("bench: [%d/%d] %s ...", i, len(cfg.systems), system)
            load = os.getloadavg()[0]
            res = run_worker_process("medtune.bench.train_speed", {**worker_cfg, "workdir": str(work)}, system=system,
                                     timeout=cfg.timeout, stream=stream)
            wall = res["wall_s"]
            res["loadavg"] = [load, os.getloadavg()[0]]  # 1-minute, before and after
            if not res.get("error"):
                try:
                    res.update(summarize_steps(res["steps"]))
                except (KeyError, ValueError, TypeError) as e:
                    res["error"] = f"bad worker result: {e}"
            systems[system] = res
            if res.get("error"):
                log.info("bench: %s failed: %s", system, res["error"])
            else:
                log.info("bench: %s: %.0f tokens/s, loss %.4f, peak RSS %.0f MB, %.0f s", system,
                         res["tokens_per_s"], res["loss"], res["peak_rss_mb"], wall)
        # Measured again at the end: something else running on the machine only ever lowers a peak, so the
        # higher of the two is the better estimate of what this machine can do.
        peaks.append(run_subprocess(peak_cmd, env=env, timeout=cfg.timeout, stream=stream)[0])
    peak = best_peak(peaks)
    result = assemble(systems, peak, cfg=cfg, base_params=base_params, data_spec=data_spec, model_dir=model_dir,
                      command=command or shlex.join(sys.argv), load=(load_before, os.getloadavg()))
    write_json(json_path, result)
    return result


PEAK_KEYS = ("bf16_tflops", "fp32_tflops", "cuda_bf16_tflops", "cuda_fp32_tflops")  # medtune.bench.peak's figures


def best_peak(runs: list[dict]) -> dict:
    """Per dtype, the highest of several peak measurements (error only when every run failed)."""
    out: dict = {"runs": runs}
    for key in PEAK_KEYS:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values:
            out[key] = max(values)
    if not any(k in out for k in ("bf16_tflops", "fp32_tflops")):
        out["error"] = "; ".join(str(r.get("error")) for r in runs)
    return out


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or a.get("error") or b.get("error"):
        return None
    return a["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None


def run_precision(setup: dict) -> str:
    """"bf16" or "fp32": the matmul precision a worker trained in, from its setup's `precision` ("fp32",
    "bf16 autocast (fp32 weights)", "auto → fp32", ...); "cuda_bf16"/"cuda_fp32" when it trained on the GPU."""
    precision = "bf16" if "bf16" in str(setup.get("precision", "")).split("→")[-1] else "fp32"
    return f"cuda_{precision}" if setup.get("device") == "cuda" else precision


def assemble(systems: dict[str, dict], peak: dict, *, cfg: BenchConfig, base_params: int, data_spec: str,
             model_dir: str, command: str, load: tuple) -> dict:
    fpt = flops_per_token(base_params)
    ok = [s for s in systems.values() if not s.get("error")]
    budget = min((s["tokens_total"] for s in ok), default=0)
    for s in ok:
        s["loss_equal_tokens"] = loss_at_tokens(s["steps"], budget)
        for key in PEAK_KEYS:
            if peak.get(key):
                s[f"mfu_{key.removesuffix('_tflops')}_pct"] = 100 * mfu(s["tokens_per_s"], fpt, peak[key])
        s["mfu_precision"] = run_precision(s.get("setup", {}))
        s["mfu_pct"] = s.get(f"mfu_{s['mfu_precision']}_pct", float("nan"))
    machine = machine_info()
    machine["loadavg_before"], machine["loadavg_after"] = [list(map(float, x)) for x in load]
    machine["peak_error"] = peak.get("error")
    machine["peak_runs"] = peak.get("runs", [])
    return {"systems": systems,
            "speedup_vs_seed": _ratio(systems.get("medtune"), systems.get("seed")),
            "speedup_vs_trl": _ratio(systems.get("medtune"), systems.get("trl")),
            "qlora_vs_lora": _ratio(systems.get("qlora"), systems.get("medtune")),
            **{f"peak_{key}": peak.get(key) for key in PEAK_KEYS},
            "base_params": base_params, "flops_per_token": fpt, "equal_tokens_budget": budget,
            "config": {**asdict(cfg), "model_dir": model_dir, "data": data_spec, "warmup_steps": WARMUP_STEPS},
            "machine": machine, "command": command}


def format_table(result: dict) -> str:
    """The results table. MFU is against the matmul peak of the precision each run trained in (bf16 where bf16
    matmuls are fast, else fp32: medtune's `precision: auto`); both are in the JSON."""
    c, m = result["config"], result["machine"]
    head = (f"{'system':<8} {'tokens/s':>9} {'tok/step':>8} {'peak RSS MB':>11} {'loss':>7} {'loss@=tok':>9} "
            f"{'MFU %':<16} {'wall s':>7}")
    lines = [f"medtune bench train: {c['model']} | {c['steps']} steps x batch {c['batch_size']}, max_length "
             f"{c['max_length']} | data {c['data']}",
             f"matmul peak (best of before/after) bf16 {fmt(result['peak_bf16_tflops'], '.3f')} / fp32 {fmt(result['peak_fp32_tflops'], '.3f')} "
             + (f"| GPU bf16 {fmt(result['peak_cuda_bf16_tflops'], '.1f')} / fp32 {fmt(result['peak_cuda_fp32_tflops'], '.1f')} "
                if result.get("peak_cuda_bf16_tflops") else "") +
             f"TFLOP/s | {m['torch_threads']} threads | load avg {m['loadavg_before'][0]:.2f} -> "
             f"{m['loadavg_after'][0]:.2f} | tokens/s excludes the first {c['warmup_steps']} steps",
             "", *system_rows(result["systems"], head, 8, lambda name, s: (
                 f"{name:<8} {fmt(s['tokens_per_s'], '9.1f')} {fmt(s['tokens_per_step'], '8.0f')} "
                 f"{fmt(s['peak_rss_mb'], '11.0f')} {fmt(s['loss'], '7.4f')} "
                 f"{fmt(s.get('loss_equal_tokens'), '9.4f')} {fmt(s.get('mfu_pct'), '6.2f')} {s.get('mfu_precision', '-'):<9} "
                 f"{fmt(s['wall_s'], '7.0f')}")),
             "MFU %: against the peak of the precision (and device: cuda_*) the run trained in (JSON: MFU bf16 % = "
             "mfu_bf16_pct, MFU fp32 % = mfu_fp32_pct, for every run; mfu_cuda_bf16_pct, mfu_cuda_fp32_pct with a GPU)"]
    ratios = [f"medtune/{k} {fmt(result[f'speedup_vs_{k}'], '.2f')}x" for k in ("seed", "trl")
              if result.get(f"speedup_vs_{k}") is not None]
    if result.get("qlora_vs_lora") is not None:
        ratios.append(f"qlora/medtune {fmt(result['qlora_vs_lora'], '.2f')}x")
    if ratios:
        lines += ["", "tokens/s: " + ", ".join(ratios)]
    return "\n".join(lines)


# ---- worker entry point ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    if argv is None and _worker_system(sys.argv[1:]) in ("medtune", "qlora"):
        allocator_for_training("cpu", release_memory=False)  # what `medtune train` does: re-executes at most once
    return worker_main(argv, run_worker, prog="python -m medtune.bench.train_speed",
                       description="One benchmark worker (run by `medtune bench train`).", systems=SYSTEMS)


def _worker_system(argv: list[str]) -> str | None:
    """The SYSTEM of `--worker SYSTEM` in a worker's arguments."""
    return argv[argv.index("--worker") + 1] if "--worker" in argv[:-1] else None


if __name__ == "__main__":
    sys.exit(main())

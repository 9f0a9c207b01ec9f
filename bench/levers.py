"""A/B timing of training-step levers in ONE process, interleaved (A, B, A, B, ...), so that load from other
processes on a shared machine hits both sides alike. Not part of the package: the tool behind the lever tables
of bench/RESULTS.md.

    python bench/levers.py profile [--batch 4 --length 512]          # torch.profiler top ops of one step
    python bench/levers.py ab LEVER [--repeats 3]                    # median step seconds with/without LEVER
    python bench/levers.py rss [--steps 4]                           # peak RSS of a few steps (run it per allocator)
    python bench/levers.py saved LEVER                               # MB saved for backward, without/with
    python bench/levers.py grads                                     # fused vs peft LoRA gradient cosine

Model: SmolLM2-135M (medtune's alias), LoRA r=64 alpha=16 dropout=0.1 on q/k/v/o, the fullest packed rows of
medical_terms.jsonl (4 x 512 tokens: the heaviest step of `medtune bench train`), AdamW; the step is medtune's: `loss_sum` (chunked cross-entropy) / loss tokens, backward,
optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from medtune.bench.train_speed import build_texts, find_data
from medtune.data.batching import pack_bins, pack_collate
from medtune.data.render import Sample
from medtune.models import add_lora, load_base_model, load_tokenizer, resolve_model
from medtune.recipe import LoraConfig
from medtune.train import fast_attention, fast_norm, fused_lora
from medtune.train.allocator import return_freed_memory_to_os
from medtune.train.objectives.sft import loss_sum

CPU = torch.device("cpu")


def build(args):
    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = load_base_model(model_dir, dtype=dtype, device=CPU)
    lora = LoraConfig(r=args.r, alpha=16, dropout=args.dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = add_lora(model, lora, autocast=args.bf16, fast=False)
    model.train()
    texts = build_texts(find_data(args.data), tok, 400, seed=0)
    samples = []
    for i, t in enumerate(texts):
        ids = tok(t)["input_ids"][: args.length]
        samples.append(Sample(ids, ids, "bench", i))
    bins = pack_bins([len(s.input_ids) for s in samples], args.length)
    if args.pick == "fullest":  # the heaviest step of the bench
        bins.sort(key=lambda b: -sum(len(samples[i].input_ids) for i in b))
    else:  # a typical step
        random.Random(0).shuffle(bins)
    batch = pack_collate([[samples[i] for i in b] for b in bins[: args.batch]], tok.pad_token_id or 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else nullcontext()
    return model, batch, opt, autocast


def step(model, batch, opt, autocast) -> float:
    loss = loss_sum(model, batch, autocast)
    (loss / batch.num_loss_tokens).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item() / batch.num_loss_tokens


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall s, process CPU s). With OMP_NUM_THREADS=1 the CPU time is the work itself, nearly blind to other
    processes on the machine (the wall time is not)."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gqa_on(model) -> None:
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"  # read by transformers at every attention call


def gqa_off(model) -> None:
    os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)


def compile_on(model) -> None:
    """torch.compile (inductor) of each decoder layer's forward; compiled once, kept across on/off switches."""
    for layer in model.get_decoder().layers:
        if not hasattr(layer, "_levers_compiled"):
            layer._levers_compiled = torch.compile(layer.forward, dynamic=False)
        layer.forward = layer._levers_compiled


def compile_off(model) -> None:
    for layer in model.get_decoder().layers:
        layer.__dict__.pop("forward", None)


def per_document_on(model) -> None:
    fast_attention.PER_DOCUMENT = True


def per_document_off(model) -> None:
    fast_attention.PER_DOCUMENT = False


LEVERS: dict[str, tuple[Callable, Callable]] = {
    "per_document": (per_document_on, per_document_off),
    "gqa": (gqa_on, gqa_off),
    "compile": (compile_on, compile_off),
    "fused_lora": (fused_lora.install, fused_lora.uninstall),
    "fast_norm": (fast_norm.install, fast_norm.uninstall),
    "fast_attention": (fast_attention.install, fast_attention.uninstall),
}


def cmd_ab(args) -> dict:
    model, batch, opt, autocast = build(args)
    for n in filter(None, args.base.split("+")):  # on for both sides
        LEVERS[n][0](model)
    names = args.lever.split("+")
    on = [LEVERS[n][0] for n in names]
    off = [LEVERS[n][1] for n in reversed(names)]
    for _ in range(args.warmup):  # both sides warm (allocator, kernels, compilation)
        for switch in (on, off):
            for f in switch:
                f(model)
            step(model, batch, opt, autocast)
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for side in ("off", "on"):
            for f in on if side == "on" else off:
                f(model)
            wall, used = cpu_timed(lambda: step(model, batch, opt, autocast))
            times[side].append(wall)
            cpu[side].append(used)
            print(side, f"wall {wall:.2f}s cpu {used:.2f}s", os.getloadavg()[0], file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"lever": args.lever, "base": args.base, "threads": torch.get_num_threads(), "wall": times, "cpu": cpu, "median_wall": med,
            "median_cpu": med_cpu, "ratio_wall_on_off": med["on"] / med["off"],
            "ratio_cpu_on_off": med_cpu["on"] / med_cpu["off"], "tokens": batch.num_tokens, "loadavg": os.getloadavg()}


def cmd_profile(args) -> dict:
    model, batch, opt, autocast = build(args)
    for n in filter(None, args.lever.split("+")):
        LEVERS[n][0](model)
    for _ in range(args.warmup):
        step(model, batch, opt, autocast)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=False) as prof:
        t = timed(lambda: step(model, batch, opt, autocast))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return {"step_s": t, "tokens": batch.num_tokens, "loadavg": os.getloadavg()}


def cmd_rss(args) -> dict:
    if os.environ.get("LEVERS_RELEASE_MEMORY"):
        assert return_freed_memory_to_os()
    model, batch, opt, autocast = build(args)
    for n in filter(None, args.lever.split("+")):
        LEVERS[n][0](model)
    after_load = rss_mb()
    times, cpu, peaks, faults = [], [], [], []
    for _ in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        wall, used = cpu_timed(lambda: step(model, batch, opt, autocast))
        times.append(wall)
        cpu.append(used)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        peaks.append(rss_mb())
    return {"lever": args.lever, "threads": torch.get_num_threads(), "after_load_mb": after_load,
            "peak_mb_per_step": peaks, "step_s": times, "cpu_s": cpu, "minor_faults_per_step": faults,
            "malloc_conf": os.environ.get("MALLOC_CONF", ""),
            "preload": os.environ.get("LD_PRELOAD", ""),
            "release_memory": bool(os.environ.get("LEVERS_RELEASE_MEMORY")), "loadavg": os.getloadavg()}


def _counting_pack(storages: dict[int, int], shapes: dict[str, float]):
    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in storages:
            storages[ptr] = t.untyped_storage().nbytes()
            key = f"{tuple(t.shape)} {t.dtype}"
            shapes[key] = shapes.get(key, 0) + storages[ptr] / 2**20
        return t

    return pack


def cmd_saved(args) -> dict:
    """MB of distinct storages saved for backward by one forward, without and with the levers."""
    model, batch, opt, autocast = build(args)
    out = {}
    for side in ("off", "on"):
        for n in filter(None, args.lever.split("+")):
            LEVERS[n][0 if side == "on" else 1](model)
        storages: dict[int, int] = {}
        shapes: dict[str, float] = {}
        pack = _counting_pack(storages, shapes)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_sum(model, batch, autocast)
        del loss
        top = sorted(shapes.items(), key=lambda kv: -kv[1])[:12]
        out[side] = {"saved_mb": sum(storages.values()) / 2**20, "top": [(k, round(v, 1)) for k, v in top]}
    return out


def cmd_grads(args) -> dict:
    model, batch, opt, autocast = build(args)
    out = {}
    for n in filter(None, args.lever.split("+")):
        grads = {}
        for side in ("off", "on"):
            (LEVERS[n][0] if side == "on" else LEVERS[n][1])(model)
            torch.manual_seed(0)
            loss = loss_sum(model, batch, autocast)
            (loss / batch.num_loss_tokens).backward()
            grads[side] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
            opt.zero_grad(set_to_none=True)
        LEVERS[n][1](model)
        out[n] = torch.nn.functional.cosine_similarity(grads["on"], grads["off"], dim=0).item()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("ab", "profile", "rss", "grads", "saved"))
    p.add_argument("lever", nargs="?", default="")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=None, help="default: ../shared/data/train/medical_terms.jsonl, else demo:terms")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--pick", choices=("fullest", "random"), default="fullest", help="which packed rows form the batch")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", help="bf16 base + autocast (medtune's path where bf16 is fast)")
    p.add_argument("--base", default="", help="ab: levers on for both sides (LEVER+LEVER)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    result = {"ab": cmd_ab, "profile": cmd_profile, "rss": cmd_rss, "grads": cmd_grads, "saved": cmd_saved}[args.command](args)
    print(json.dumps(result, default=str))
    Path("/tmp/levers-last.json").write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`medtune bench scale`: how medtune's training step costs grow with sequence length and model width.

For every (width, method, length) the medtune training step (the same `load_base_model`, `add_lora` and
`loss_sum` that `medtune.train.trainer` runs, with its defaults, AdamW on the LoRA weights) runs in its OWN subprocess
(`python -m medtune.bench.scale --worker --config JSON`), so peak memory is per configuration:

  widths   random-init LLaMA models shaped like SmolLM2-135M, SmolLM2-360M and a ~1B model (TinyLlama-like
           width and depth), all with SmolLM2's 49,152-token vocabulary and tied embeddings. Random weights
           cost exactly what trained ones do; they are built once into ~/.cache/medtune/bench/ in bf16.
  methods  lora: frozen base in bf16 where the CPU supports it (fp32 otherwise), LoRA in fp32;
           qlora: frozen base in 4-bit NF4 with double quantisation (bitsandbytes), LoRA in fp32.
  lengths  one causal sequence of `length` tokens per row, batch 1: the step's work grows linearly with the
           length, attention quadratically.

Each worker reports tokens/s over the steps after the first (warm-up) and where memory goes, measured:
  runtime      resident memory after importing torch/transformers/peft, before any model
  weights      bytes of the frozen base's tensors (bf16, or packed 4-bit + quantisation state)
  lora_state   LoRA parameters + gradients + AdamW's two moments, all fp32 (4 x the LoRA parameter bytes)
  activations  bytes of the tensors autograd saved for backward in one step (saved-tensor hooks, each storage
               counted once)
  logits       the chunked cross-entropy's transient: one chunk of logits in bf16 and fp32 plus its softmax
  peak_rss     the worker's peak resident memory during the steps (VmHWM, reset after loading); `other` is what
               the named parts do not explain (allocator slack, matmul workspaces, backward transients).
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medtune.bench.harness import machine_info, run_worker_process, worker_main, write_json
from medtune.bench.train_speed import count_base_params
from medtune.errors import MedtuneError
from medtune.recipe import DEFAULT_MODEL

log = logging.getLogger("medtune")

# name → LLaMA shape; the rest (vocabulary, rope, norms, tied embeddings) comes from the default model's config
WIDTHS: dict[str, dict[str, int]] = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=32,
               num_key_value_heads=8),
}
METHODS = ("lora", "qlora")
LENGTHS = (256, 512, 1024, 2048)
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ScaleConfig:
    widths: tuple[str, ...] = tuple(WIDTHS)
    methods: tuple[str, ...] = METHODS
    lengths: tuple[int, ...] = LENGTHS
    steps: int = 3  # per configuration; the first is warm-up
    lora_r: int = 64
    lora_alpha: float = 16
    target_modules: tuple[str, ...] = TARGET_MODULES
    timeout: float | None = None  # per worker, seconds
    template_model: str = DEFAULT_MODEL  # config and tokenizer donor of the random-init models
    cache_dir: str | None = None  # where random-init models live (default ~/.cache/medtune/bench)
    extra_shapes: dict[str, dict[str, int]] = field(default_factory=dict)  # tests: tiny widths


def scale_config(*, widths: str | None = None, methods: str | None = None, lengths: str | None = None,
                 steps: int = 3, quick: bool = False) -> ScaleConfig:
    """The CLI's flags → a validated config. --quick: 135m, LoRA and QLoRA, lengths 256 and 512, 2 steps."""
    cfg = ScaleConfig(steps=2 if quick and steps == 3 else steps)
    if quick:
        cfg.widths, cfg.lengths = ("135m",), (256, 512)
    if widths:
        cfg.widths = _pick(widths, WIDTHS, "--widths")
    if methods:
        cfg.methods = _pick(methods, METHODS, "--methods")
    if lengths:
        try:
            cfg.lengths = tuple(int(x) for x in lengths.split(",") if x.strip())
        except ValueError:
            raise MedtuneError(f"expected comma-separated integers, got {lengths!r}", field="--lengths") from None
        if not cfg.lengths or min(cfg.lengths) < 16:
            raise MedtuneError("lengths must be at least 16", field="--lengths")
    if cfg.steps < 2:
        raise MedtuneError("must be at least 2 (the first step is warm-up)", field="--steps")
    return cfg


def _pick(text: str, choices, flag: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip().lower() for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise MedtuneError(f"unknown {', '.join(unknown) or '(none)'}; choose from {','.join(choices)}", field=flag)
    return names


# ---- random-init models -----------------------------------------------------------------------------------------

def random_model(width: str, shape: dict[str, int], template_dir: str, cache: Path) -> Path:
    """A LLaMA of this shape with random weights, saved once in bf16 safetensors with the template's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = cache / f"random-{width}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    config = AutoConfig.from_pretrained(template_dir)
    for key, value in shape.items():
        setattr(config, key, value)
    config.head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # a 1B model built in fp32 would need 4 GB for a moment
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(template_dir).save_pretrained(tmp)
    tmp.rename(target)
    return target


# ---- the worker (its own process) ---------------------------------------------------------------------------------

def _rss_mb(key: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _tensor_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def run_worker(cfg: dict) -> dict:
    import torch

    from medtune.data.batching import Batch
    from medtune.models import add_lora, bf16_supported, load_base_model, pick_device
    from medtune.recipe import LoraConfig, QuantConfig
    from medtune.train import loss as loss_mod
    from medtune.train.objectives.sft import loss_sum

    runtime = _rss_mb()
    device = pick_device("auto")
    bf16 = bf16_supported(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    quantized = cfg["method"] == "qlora"
    quant = QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True) if quantized else None
    model = load_base_model(cfg["model_dir"], dtype=dtype, device=device, quant=quant)
    weights = _tensor_bytes(list(model.parameters()) + list(model.buffers()))
    lora = LoraConfig(r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=0.1, target_modules=list(cfg["target_modules"]))
    model = add_lora(model, lora, quantized=quantized, autocast=bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    lora_state = 4 * sum(p.numel() * p.element_size() for p in params)  # weights, grads, exp_avg, exp_avg_sq
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    length = cfg["length"]
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (1, length + 1), generator=gen)  # (1, T+1)
    batch = Batch(input_ids=ids[:, :-1], targets=ids[:, 1:], position_ids=torch.arange(length)[None],
                  attention_mask=None, num_loss_tokens=length, num_tokens=length).to(device)

    saved: dict[int, int] = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    _reset_peak_rss()
    before_steps = _rss_mb()
    seconds, losses = [], []
    for step in range(cfg["steps"]):
        start = time.perf_counter()
        if step == 0:  # warm-up step: also count what autograd keeps for backward
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                loss = loss_sum(model, batch, autocast)
        else:
            loss = loss_sum(model, batch, autocast)
        (loss / length).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item() / length)
    activations = sum(n for ptr, n in saved.items() if ptr not in param_ptrs)
    peak = _rss_mb("VmHWM")
    rows = min(loss_mod.CHUNK, length)
    logits = rows * vocab * (2 + 4 + 2)  # one chunk: bf16 product, fp32 copy (softmax in place), bf16 for the matmul
    mb = 1 / 2**20
    memory = {"runtime": runtime, "weights": weights * mb, "lora_state": lora_state * mb,
              "activations": activations * mb, "logits": logits * mb, "peak_rss": peak,
              "rss_before_steps": before_steps}
    memory["other"] = peak - sum(memory[k] for k in ("runtime", "weights", "lora_state", "activations", "logits"))
    measured = seconds[1:]
    return {"tokens_per_s": length * len(measured) / sum(measured), "step_s": measured, "warmup_s": seconds[0],
            "loss": losses[-1], "memory_mb": memory, "dtype": "4-bit NF4" if quantized else str(dtype).split(".")[-1],
            "device": str(device), "threads": torch.get_num_threads(),
            "lora_params": sum(p.numel() for p in params)}


# ---- the harness ----------------------------------------------------------------------------------------------------

def run_scale(cfg: ScaleConfig, *, json_path: str | Path | None = None, plot_path: str | Path | None = None,
              command: str | None = None) -> dict:
    from medtune.models import medtune_home, resolve_model

    template = resolve_model(cfg.template_model)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else medtune_home() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    shapes = {**WIDTHS, **cfg.extra_shapes}
    rows = []
    total = len(cfg.widths) * len(cfg.methods) * len(cfg.lengths)
    for width in cfg.widths:
        model_dir = random_model(width, shapes[width], template, cache)
        params = count_base_params(str(model_dir))
        for method in cfg.methods:
            for length in cfg.lengths:
                log.info("scale: [%d/%d] %s %s length %d ...", len(rows) + 1, total, width, method, length)
                worker = {"model_dir": str(model_dir), "method": method, "length": length, "steps": cfg.steps,
                          "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": list(cfg.target_modules)}
                res = run_worker_process("medtune.bench.scale", worker, timeout=cfg.timeout)
                res.update(width=width, params=params, method=method, length=length)
                rows.append(res)
                if res.get("error"):
                    log.info("scale: failed: %s", res["error"])
                else:
                    log.info("scale: %.0f tokens/s, peak RSS %.0f MB", res["tokens_per_s"], res["memory_mb"]["peak_rss"])
    result = {"rows": rows, "config": asdict(cfg), "machine": machine_info(),
              "command": command or shlex.join(sys.argv)}
    write_json(json_path, result)
    if plot_path:
        plot(result, Path(plot_path))
    return result


def format_table(result: dict) -> str:
    head = (f"{'width':<6} {'params':>7} {'method':<6} {'length':>6} {'tokens/s':>9} {'peak RSS':>9} {'runtime':>8} "
            f"{'weights':>8} {'LoRA+opt':>8} {'activ.':>8} {'logits':>7} {'other':>7}")
    lines = ["medtune bench scale: batch 1 x length tokens per step; memory in MB", "", head, "-" * len(head)]
    for r in result["rows"]:
        label = f"{r['width']:<6} {r['params'] / 1e6:6.0f}M {r['method']:<6} {r['length']:>6}"
        if r.get("error"):
            lines.append(f"{label} error: {r['error']}")
            continue
        m = r["memory_mb"]
        lines.append(f"{label} {r['tokens_per_s']:9.1f} {m['peak_rss']:9.0f} {m['runtime']:8.0f} {m['weights']:8.0f} "
                     f"{m['lora_state']:8.0f} {m['activations']:8.0f} {m['logits']:7.0f} {m['other']:7.0f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    ok = [r for r in result["rows"] if not r.get("error")]
    for width in dict.fromkeys(r["width"] for r in ok):
        for method, style in (("lora", "-o"), ("qlora", "--s")):
            pts = sorted((r["length"], r) for r in ok if r["width"] == width and r["method"] == method)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            speed.plot(xs, [r["tokens_per_s"] for _, r in pts], style, label=f"{width} {method}")
            memory.plot(xs, [r["memory_mb"]["peak_rss"] / 1024 for _, r in pts], style, label=f"{width} {method}")
    for ax, title, unit in ((speed, "training speed", "tokens/s"), (memory, "peak memory", "peak RSS (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens, batch 1)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    speed.set_yscale("log")
    speed.legend(fontsize=8)
    fig.suptitle(f"medtune bench scale — {result['machine'].get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, run_worker, prog="python -m medtune.bench.scale",
                       description="One `medtune bench scale` worker.")


if __name__ == "__main__":
    sys.exit(main())

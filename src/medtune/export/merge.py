"""`medtune merge`: a run's adapter folded into its base model, saved as a plain transformers model folder.

The base is always loaded in fp32, also when the run trained on a 4-bit base: merging into 4-bit weights would
round every merged weight to the 4-bit grid (peft warns about it) and the result could not be saved as a normal
model. The merge happens in fp32 and the weights are cast to `--dtype` only when saved, so the merged model
needs about 4 bytes of RAM per parameter while merging (a 7B model: ~28 GB).

The folder gets what `AutoModelForCausalLM`/`AutoTokenizer` need plus what medtune needs to export it:
safetensors weights, the run's tokenizer (with the chat template used in training), the run's generation config
(stops on the end-of-turn tokens), a model card, and `medtune_merged.json` (template, stop tokens, system prompt).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from medtune.errors import MedtuneError
from medtune.generate import REPETITION_PENALTY
from medtune.run.card import merged_card
from medtune.run.layout import CARD, PLOTS
from medtune.run.run import Run

log = logging.getLogger("medtune")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MERGE_INFO = "medtune_merged.json"


def default_sampling() -> dict[str, float]:
    """medtune generate/chat's defaults, in Ollama's PARAMETER names."""
    return {"temperature": 0.0, "repeat_penalty": REPETITION_PENALTY, "num_predict": 256}


def run_sampling(run: str | Path) -> dict[str, float]:
    """How medtune's generate/chat answer with this run by default: greedy, the run's repetition penalty
    (recipe `samples.repetition_penalty`, else medtune.generate's), its generation config's answer length."""
    penalty = (Run(run).recipe_tree().get("samples") or {}).get("repetition_penalty")
    return default_sampling() | ({"repeat_penalty": penalty} if penalty is not None else {})


def merged_model(run: Run):
    """(base + adapter merged in fp32, the run's tokenizer). The base loads unquantised whatever the run used."""
    if run.meta.quant.get("load_in_4bit"):
        log.info("the run trained on a 4-bit base; merging into the full-precision base instead")
    model, tok = run.load(dtype=torch.float32, device=torch.device("cpu"), quantized=False)
    model = model.merge_and_unload()
    model.eval()
    return model, tok


def _write_merged(run: Run, model, tok, folder: Path, dtype: str) -> None:
    meta = run.meta
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    info = {"merged_from": str(run.path.resolve()), "base_model": meta.base_model, "dtype": dtype,
            "template": meta.template, "stop_tokens": meta.stop_tokens, "stop_token_ids": meta.stop_token_ids,
            "system_prompt": run.system_prompt, "max_length": meta.max_length, "sampling": run_sampling(run.path)}
    (folder / MERGE_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
    (folder / CARD).write_text(merged_card(run.path, dtype), encoding="utf-8")
    if (run.path / PLOTS).is_dir():  # the card shows them
        shutil.copytree(run.path / PLOTS, folder / PLOTS)


def merge_run(run: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    """Write the merged model folder `out` (refuses a non-empty one; written to a fresh `.<out>.*.tmp` folder
    beside it, then renamed)."""
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise MedtuneError(f"unknown dtype '{dtype}': use {', '.join(DTYPES)}", field="--dtype")
    run, out = Run(run).validate(), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedtuneError("output folder exists and is not empty; choose another --out", file=str(out))
    model, tok = merged_model(run)
    model.to(DTYPES[dtype])
    # A base dequantised from a GGUF may still carry its quantiser; save_pretrained would refuse the model.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.generation_config = GenerationConfig.from_pretrained(run.path)

    out.parent.mkdir(parents=True, exist_ok=True)
    # A fresh folder of our own next to `out` (never a fixed `<out>.tmp` name: a user's folder of that name is
    # theirs); removed if anything fails, renamed to `out` when complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's is 0700; a model folder is as readable as save_pretrained would make it
    try:
        _write_merged(run, model, tok, tmp, dtype)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


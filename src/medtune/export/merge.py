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
import yaml

from medtune.errors import MedtuneError
from medtune.run.adapter import check_adapter
from medtune.run.card import merged_card
from medtune.run.layout import ADAPTER_FILES, CARD, META, PLOTS, RECIPE
from medtune.run.meta import is_run_dir, read_run_meta

log = logging.getLogger("medtune")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MERGE_INFO = "medtune_merged.json"


def check_run(run: str | Path) -> Path:
    run = Path(run)
    if not is_run_dir(run):
        raise MedtuneError("not a medtune run directory (no medtune.json)", file=str(run))
    if not all((run / name).is_file() for name in ADAPTER_FILES):
        raise MedtuneError("the run has no adapter (adapter_config.json + adapter_model.safetensors); did training "
                           "finish? A checkpoint can be resumed with resume=true", file=str(run))
    check_adapter(run)
    return run


def run_sampling(run: Path) -> dict[str, float]:
    """How medtune's generate/chat answer with this run by default: greedy, the run's repetition penalty
    (recipe `samples.repetition_penalty`, else medtune.generate's), its generation config's answer length."""
    from medtune.generate import REPETITION_PENALTY

    recipe = run / RECIPE
    tree = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}) if recipe.is_file() else {}
    penalty = (tree.get("samples") or {}).get("repetition_penalty")
    return {"temperature": 0.0, "repeat_penalty": penalty if penalty is not None else REPETITION_PENALTY,
            "num_predict": 256}


def run_system_prompt(run: Path) -> str | None:
    """The system prompt the run trained with (recipe `tokenizer.system_prompt`), if any."""
    recipe = run / RECIPE
    if not recipe.is_file():
        return None
    return (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("tokenizer", {}).get("system_prompt")


def merged_model(run: str | Path):
    """(base + adapter merged in fp32, the run's tokenizer). The base loads unquantised whatever the run used."""
    from peft import PeftModel

    from medtune.models import load_base_model, load_tokenizer

    run = check_run(run)
    meta = read_run_meta(run)
    base_path = meta.base_model_path
    if not Path(base_path).is_dir():
        raise MedtuneError(f"the run's base model folder is gone: {base_path}", file=str(run / META),
                           field="base_model_path")
    if meta.quant.get("load_in_4bit"):
        log.info("the run trained on a 4-bit base; merging into the full-precision base instead")
    tok = load_tokenizer(str(run))
    base = load_base_model(base_path, dtype=torch.float32, device=torch.device("cpu"), quant=None,
                           trust_remote_code=meta.trust_remote_code)
    if len(tok) > base.get_input_embeddings().num_embeddings:  # the run added a pad token
        base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, str(run)).merge_and_unload()
    model.eval()
    return model, tok


def _write_merged(run: Path, model, tok, folder: Path, dtype: str) -> None:
    meta = read_run_meta(run)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    info = {"merged_from": str(run.resolve()), "base_model": meta.base_model, "dtype": dtype,
            "template": meta.template, "stop_tokens": meta.stop_tokens, "stop_token_ids": meta.stop_token_ids,
            "system_prompt": run_system_prompt(run), "max_length": meta.max_length, "sampling": run_sampling(run)}
    (folder / MERGE_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
    (folder / CARD).write_text(merged_card(run, dtype), encoding="utf-8")
    if (run / PLOTS).is_dir():  # the card shows them
        shutil.copytree(run / PLOTS, folder / PLOTS)


def merge_run(run: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    """Write the merged model folder `out` (refuses a non-empty one; written to a fresh `.<out>.*.tmp` folder
    beside it, then renamed)."""
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise MedtuneError(f"unknown dtype '{dtype}': use {', '.join(DTYPES)}", field="--dtype")
    run, out = check_run(run), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedtuneError("output folder exists and is not empty; choose another --out", file=str(out))
    model, tok = merged_model(run)
    model.to(DTYPES[dtype])
    # A base dequantised from a GGUF may still carry its quantiser; save_pretrained would refuse the model.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.generation_config = GenerationConfig.from_pretrained(run)

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


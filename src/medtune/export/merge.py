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
from pathlib import Path

import torch
import yaml

from medtune.errors import MedtuneError
from medtune.generate import is_run_dir, read_run_meta

log = logging.getLogger("medtune")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MERGE_INFO = "medtune_merged.json"


def check_run(run: str | Path) -> Path:
    run = Path(run)
    if not is_run_dir(run):
        raise MedtuneError("not a medtune run directory (no medtune.json)", file=str(run))
    if not (run / "adapter_config.json").is_file() or not (run / "adapter_model.safetensors").is_file():
        raise MedtuneError("the run has no adapter (adapter_config.json + adapter_model.safetensors); did training "
                           "finish? A checkpoint can be resumed with resume=true", file=str(run))
    return run


def run_system_prompt(run: Path) -> str | None:
    """The system prompt the run trained with (recipe `tokenizer.system_prompt`), if any."""
    recipe = run / "recipe.yaml"
    if not recipe.is_file():
        return None
    return (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("tokenizer", {}).get("system_prompt")


def merged_model(run: str | Path):
    """(base + adapter merged in fp32, the run's tokenizer). The base loads unquantised whatever the run used."""
    from peft import PeftModel

    from medtune.models import load_base_model, load_tokenizer

    run = check_run(run)
    meta = read_run_meta(run)
    base_path = meta.get("base_model_path")
    if not base_path or not Path(base_path).is_dir():
        raise MedtuneError(f"the run's base model folder is gone: {base_path}", file=str(run / "medtune.json"),
                           field="base_model_path")
    if meta.get("quant", {}).get("load_in_4bit"):
        log.info("the run trained on a 4-bit base; merging into the full-precision base instead")
    tok = load_tokenizer(str(run))
    base = load_base_model(base_path, dtype=torch.float32, device=torch.device("cpu"), quant=None,
                           trust_remote_code=meta.get("trust_remote_code", False))
    if len(tok) > base.get_input_embeddings().num_embeddings:  # the run added a pad token
        base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, str(run)).merge_and_unload()
    model.eval()
    return model, tok


def merge_run(run: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    """Write the merged model folder `out` (refuses a non-empty one; written to `out.tmp`, then renamed)."""
    from transformers import GenerationConfig

    from medtune.train.rundir import NOT_MEDICAL_ADVICE

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

    meta = read_run_meta(run)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {"merged_from": str(run.resolve()), "base_model": meta.get("base_model"), "dtype": dtype,
            "template": meta.get("template"), "stop_tokens": meta.get("stop_tokens"),
            "stop_token_ids": meta.get("stop_token_ids"), "system_prompt": run_system_prompt(run),
            "max_length": meta.get("max_length")}
    (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
    (tmp / "README.md").write_text(merged_card(run, dtype, NOT_MEDICAL_ADVICE), encoding="utf-8")
    if (run / "plots").is_dir():  # the card shows them
        shutil.copytree(run / "plots", tmp / "plots")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def merged_card(run: Path, dtype: str, notice: str) -> str:
    """The run's model card with transformers front matter, a note on the merge, and the notice on top."""
    card = (run / "README.md").read_text(encoding="utf-8") if (run / "README.md").is_file() else f"# {run.name}\n"
    front: dict = {}
    if card.startswith("---\n") and "\n---" in card[4:]:
        head, card = card[4:].split("\n---", 1)
        front = yaml.safe_load(head) or {}
        card = card.lstrip("\n")
    front["library_name"] = "transformers"
    front["tags"] = [*[t for t in front.get("tags", []) if t != "lora"], "merged"]
    note = (f"> **Merged model.** The adapter below is folded into its base model and saved in {dtype}. Load it "
            "with `AutoModelForCausalLM.from_pretrained(...)` and `AutoTokenizer.from_pretrained(...)` — no peft "
            "needed; `generation_config.json` stops on the chat template's end-of-turn tokens.\n>\n"
            f"> **{notice}**")
    title, _, rest = card.partition("\n")
    body = f"{title}\n\n{note}\n{rest}"
    return f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n{body}"

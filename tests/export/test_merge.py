"""`medtune merge`: the merged folder computes what base + adapter computes, loads with plain transformers,
never merges into 4-bit weights, and carries the run's tokenizer, stop tokens and a card with the notice."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from medtune.errors import MedtuneError
from medtune.export.merge import MERGE_INFO, merge_run
from medtune.run.meta import read_run_meta

IDS = torch.tensor([[1, 3, 40, 41, 42, 43, 4, 44, 45, 46]])


def reference_logits(run) -> torch.Tensor:
    """Base + adapter, unmerged, in fp32: what peft computes at inference."""
    base = AutoModelForCausalLM.from_pretrained(read_run_meta(run).base_model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run)).eval()
    with torch.no_grad():
        return model(IDS).logits


def logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not hasattr(model, "peft_config") and type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def merged_fp32(tiny_run_dir, tmp_path_factory):
    return merge_run(tiny_run_dir, tmp_path_factory.mktemp("merged") / "fp32", dtype="fp32")


def test_merged_logits_equal_base_plus_adapter(tiny_run_dir, merged_fp32):
    ref = reference_logits(tiny_run_dir)
    base = AutoModelForCausalLM.from_pretrained(read_run_meta(tiny_run_dir).base_model_path).eval()
    with torch.no_grad():
        assert (base(IDS).logits - ref).abs().max() > 1e-3, "the adapter must change the logits for this test to mean anything"
    torch.testing.assert_close(logits(merged_fp32), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,torch_dtype,atol", [("fp16", torch.float16, 2e-2), ("bf16", torch.bfloat16, 1e-1)])
def test_half_precision_merge(tiny_run_dir, tmp_path, dtype, torch_dtype, atol):
    out = merge_run(tiny_run_dir, tmp_path / dtype, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch_dtype
    torch.testing.assert_close(logits(out), reference_logits(tiny_run_dir), atol=atol, rtol=0)


def test_folder_has_tokenizer_stops_and_card(tiny_run_dir, merged_fp32):
    assert (merged_fp32 / "model.safetensors").is_file() and not list(merged_fp32.glob("*.bin"))
    assert not (merged_fp32 / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(merged_fp32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # the run's ChatML template
    gen = GenerationConfig.from_pretrained(merged_fp32)
    assert gen.eos_token_id == read_run_meta(tiny_run_dir).stop_token_ids == [4, 2]
    info = json.loads((merged_fp32 / MERGE_INFO).read_text())
    assert info["stop_tokens"] == ["<|im_end|>", "</s>"] and info["system_prompt"] == "Answer briefly."
    card = (merged_fp32 / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- merged" in card
    assert "It is not medical advice" in card and "Merged model" in card
    assert "## Training data" in card  # the run's own card follows


def test_four_bit_run_merges_into_full_precision(tiny_run_dir, tmp_path):
    run = tmp_path / "qlora-run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    meta = read_run_meta(run)
    meta.quant["load_in_4bit"] = True
    meta.write(run)
    out = merge_run(run, tmp_path / "merged", dtype="fp32")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(logits(out), reference_logits(tiny_run_dir), atol=1e-5, rtol=1e-5)


def test_user_mistakes(tiny_run_dir, tiny_model_dir, tmp_path):
    with pytest.raises(MedtuneError, match="not a medtune run"):
        merge_run(tiny_model_dir, tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(MedtuneError, match="not empty"):
        merge_run(tiny_run_dir, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(MedtuneError, match="unknown dtype"):
        merge_run(tiny_run_dir, tmp_path / "b", dtype="int4")


def test_cli_merge(tiny_run_dir, tmp_path, capsys):
    from medtune.cli import main

    assert main(["merge", str(tiny_run_dir), "--out", str(tmp_path / "m"), "--dtype", "fp16"]) == 0
    assert "merged model: " in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "n")]) == 2
    assert capsys.readouterr().err.startswith("medtune: error: ")

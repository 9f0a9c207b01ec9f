"""A QLoRA run trained on CUDA (4-bit base on the GPU, bf16 compute), then `medtune merge`: the merged
full-precision model computes what the full-precision base plus the adapter computes, on the CPU and on the GPU,
and the run itself answers on CUDA with its 4-bit base (`medtune generate`)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import losses
from gpu_env import GPU, medtune, run_meta, train
from peft import PeftModel
from transformers import AutoModelForCausalLM

pytestmark = GPU
IDS = torch.tensor([[1, 3, 40, 41, 42, 43, 4, 44, 45, 46]])


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    return train(tiny_model_dir, tmp_path_factory.mktemp("qlora") / "run", "quant.load_in_4bit=true",
                 "train.precision=bf16", "train.max_steps=3", "train.lr=5e-2", "lora.dropout=0")


@pytest.fixture(scope="module")
def merged(qlora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "fp32"
    medtune("merge", str(qlora_run), "--out", str(out), "--dtype", "fp32", cwd=out.parent)
    return out


def logits(model, device: str) -> torch.Tensor:
    with torch.no_grad():
        return model.to(device).eval()(IDS.to(device)).logits.float().cpu()


def test_qlora_run_trained_on_cuda_in_4_bits(qlora_run):
    meta = run_meta(qlora_run)
    assert meta["quant"]["load_in_4bit"] is True
    assert meta["hardware"]["device"].startswith("cuda") and "4-bit" in meta["hardware"]["precision"], meta["hardware"]
    got = losses(qlora_run)
    assert len(got) == 3 and all(torch.isfinite(torch.tensor(got))), got


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_merged_qlora_run_equals_full_precision_base_plus_adapter(tiny_model_dir, qlora_run, merged, device):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = logits(base, device)
    want = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                            str(qlora_run)), device)
    assert (want - plain).abs().max() > 1e-3, "the adapter must change the logits for this test to mean anything"
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model, "peft_config")
    atol = 1e-5 if device == "cpu" else 1e-4
    torch.testing.assert_close(logits(model, device), want, atol=atol, rtol=1e-5)


def test_qlora_run_generates_on_cuda(qlora_run, tmp_path):
    """Its base loads in 4 bits onto the GPU (`medtune.models.quantized_device_map`) and answers; the text itself
    is whatever the random tiny model says (medtune() fails the test on a non-zero exit)."""
    print(medtune("generate", str(qlora_run), "--device", "cuda", "--prompt", "What is a fever?", "--no-stream",
                  "--max-new-tokens", "8", cwd=tmp_path))

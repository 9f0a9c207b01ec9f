"""The memory estimate on known numbers (the tiny LLaMA), and the refusal before any weight is loaded."""

from __future__ import annotations

import pytest
import torch

from medtune.cli import main
from medtune.errors import MedtuneError
from medtune.recipe import LoraConfig
from medtune.train import memory
from medtune.train.loss import CHUNK
from medtune.train.memory import check_memory, estimate_memory

KW = dict(quantized=False, double_quant=True, batch_size=4, max_length=128, gradient_checkpointing=False,
          optimizer="adamw")


def test_weights_and_lora_counts_match_the_real_model(tiny_model_dir):
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings: stored and counted once
    lora = LoraConfig(r=4)
    est = estimate_memory(tiny_model_dir, dtype=torch.float32, lora=lora, **KW)
    assert est.n_params == n_params
    assert est.weights == n_params * 4
    peft = get_peft_model(model, PeftLora(r=4, target_modules=lora.target_modules))
    n_lora = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert est.n_lora == n_lora
    assert est.lora == n_lora * 16, "fp32 weight + gradient + two AdamW moments"
    assert estimate_memory(tiny_model_dir, dtype=torch.bfloat16, lora=lora, **KW).weights == n_params * 2

    # tiny: hidden 64, intermediate 128, 2 layers, 2 kv heads of 16; 4 x 128 tokens; vocab from the model
    per_layer = 8 * 64 + 2 * 32 + 4 * 128
    vocab = model.config.vocab_size
    logits = min(512, CHUNK) * vocab * 8  # one chunk of fp32 logits and its softmax
    assert est.activations == 512 * (2 * per_layer + 2 * 64) * 4 + logits
    ckpt = estimate_memory(tiny_model_dir, dtype=torch.float32, lora=lora, **{**KW, "gradient_checkpointing": True})
    assert ckpt.activations == 512 * (2 * 64 + per_layer + 2 * 64) * 4 + logits
    quant = estimate_memory(tiny_model_dir, dtype=torch.float32, lora=lora, **{**KW, "quantized": True})
    assert quant.weights < est.weights


def test_refuses_when_it_will_not_fit(tiny_model_dir, monkeypatch):
    est = estimate_memory(tiny_model_dir, dtype=torch.float32, lora=LoraConfig(r=4), **KW)
    monkeypatch.setattr(memory, "available_memory", lambda device: est.total - 1)
    with pytest.raises(MedtuneError, match="will not fit in memory.*--force"):
        check_memory(est, torch.device("cpu"), force=False)
    assert "available on cpu" in check_memory(est, torch.device("cpu"), force=True)
    monkeypatch.setattr(memory, "available_memory", lambda device: est.total)
    check_memory(est, torch.device("cpu"), force=False)


def test_train_refuses_before_loading_and_force_overrides(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)
    loaded = []
    monkeypatch.setattr("medtune.train.trainer.load_base_model", lambda *a, **k: loaded.append(1) or 1 / 0)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("name: tiny\n")
    argv = ["train", str(recipe), f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "data.path=demo:qa",
            "data.format=qa", "data.limit=8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "will not fit in memory" in err and len(err.strip().splitlines()) == 1 and not loaded
    with pytest.raises(ZeroDivisionError):  # --force: goes on to load the weights
        main([*argv, "--force"])
    assert loaded


def test_data_check_prints_the_estimate(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("name: tiny\n")
    assert main(["data", "check", str(recipe), f"model={tiny_model_dir}", "data.path=demo:qa", "data.format=qa"]) == 0
    assert "estimated training memory" in capsys.readouterr().out


def test_available_memory_is_known_here():
    free = memory.available_memory(torch.device("cpu"))
    assert free is not None and free > 0

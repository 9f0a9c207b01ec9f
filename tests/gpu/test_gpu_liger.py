"""Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) on medtune's LoRA model, when liger-kernel is installed.

medtune does not switch them on (it has its own chunked loss, medtune.train.loss); this checks the precondition for
doing so on a GPU: patched into the base before `add_lora`, they leave medtune's loss path giving the same LoRA
gradients as the plain model, in fp32 and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from gpu_env import GPU
from test_qlora_cpu import (
    LORA,
    compare,
    fixed_batch,
    lora_grads,
    seed_lora,
    summary,
    tiny_llama_dir,  # noqa: F401  (a fixture)
)

from medtune.models import add_lora, load_base_model, pick_device

pytestmark = GPU


@pytest.fixture
def keep_llama_module(monkeypatch):
    """Liger patches transformers' llama module itself, not only the instance: put it back after the test."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))


def lora_model(model_dir: str, bf16: bool, liger=None):
    model = load_base_model(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32, device=pick_device("cuda"))
    if liger is not None:
        liger.apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                          fused_linear_cross_entropy=False, model=model)
    model = add_lora(model, LORA, autocast=bf16)
    seed_lora(model)
    return model


def grads(model, bf16: bool) -> dict[str, torch.Tensor]:
    batch = fixed_batch().to(pick_device("cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        return lora_grads(model, batch)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_liger_kernels_keep_the_lora_gradients(tiny_llama_dir, keep_llama_module, bf16):  # noqa: F811
    liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed")
    want = grads(lora_model(tiny_llama_dir, bf16), bf16)

    model = lora_model(tiny_llama_dir, bf16, liger)
    layer = model.get_base_model().model.layers[0]
    assert layer.mlp._get_name() == "LigerSwiGLUMLP" and layer.input_layernorm._get_name() == "LigerRMSNorm"
    stats = compare(grads(model, bf16), want)

    print("liger", "bf16" if bf16 else "fp32", summary(stats))
    if bf16:
        assert min(c for c, _ in stats.values()) >= 0.99, summary(stats)
    else:
        bad = {n: s for n, s in stats.items() if s[0] < 0.999 or s[1] > 1e-4}
        assert not bad, f"LoRA gradients with Liger's kernels differ from the plain model's: {bad}"

"""The fast path keeps its numerics honest: frozen base weights in bf16 under autocast, but LoRA weights,
their gradients and the loss in fp32. One step's LoRA gradients must match an all-fp32 reference."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from medtune.data.batching import pad_collate
from medtune.data.render import IGNORE, Sample
from medtune.models import add_lora, load_base_model
from medtune.recipe import LoraConfig
from medtune.train.objectives.sft import loss_sum

CPU = torch.device("cpu")
LORA = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear")


def batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(6, vocab, (n,), generator=g).tolist() for n in (40, 23))
    return pad_collate([Sample(a, [IGNORE] * 8 + a[8:], "t", 1), Sample(b, [IGNORE] * 5 + b[5:], "t", 2)], pad_id=0)


def lora_grads(model_dir, dtype, autocast) -> dict[str, torch.Tensor]:
    model = load_base_model(model_dir, dtype=dtype, device=CPU)
    model = add_lora(model, LORA, autocast=autocast)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # B ≠ 0 so gradients reach every A too
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in name else 0.1))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    b = batch(model.config.vocab_size)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    loss = loss_sum(model, b, ctx)
    assert loss.dtype == torch.float32
    (loss / b.num_loss_tokens).backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_fast_path_gradients_match_fp32(tiny_model_dir):
    ref = lora_grads(tiny_model_dir, torch.float32, autocast=False)
    fast = lora_grads(tiny_model_dir, torch.bfloat16, autocast=True)
    assert ref.keys() == fast.keys() and len(ref) > 0
    for name in ref:
        cos = torch.nn.functional.cosine_similarity(ref[name].flatten(), fast[name].flatten(), dim=0)
        assert cos >= 0.99, f"{name}: cosine {cos:.4f}"

"""Model helpers: the fast CPU dropout behaves like nn.Dropout, and add_lora installs it."""

from __future__ import annotations

import torch

from medtune.models import FastDropout, add_lora, load_base_model
from medtune.recipe import LoraConfig


def test_fast_dropout_keeps_the_right_share_and_scales():
    torch.manual_seed(0)
    drop = FastDropout(0.1).train()
    x = torch.ones(400_000)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert torch.equal(drop.eval()(x), x)


def test_fast_dropout_gradient_is_the_mask():
    torch.manual_seed(1)
    x = torch.randn(3, 50, requires_grad=True)
    y = FastDropout(0.25).train()(x)
    y.sum().backward()
    assert torch.allclose(x.grad, (y != 0).float() / 0.75)


def test_add_lora_uses_fast_dropout_on_cpu(tiny_model_dir):
    model = add_lora(load_base_model(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu")),
                     LoraConfig(r=4, dropout=0.1))
    drops = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert drops and not any(isinstance(m, torch.nn.Dropout) for m in model.modules())

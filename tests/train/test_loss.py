"""Chunked cross-entropy equals the plain computation (loss and gradient), across chunk boundaries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medtune.data.batching import pad_collate
from medtune.data.render import IGNORE, Sample
from medtune.models import add_lora, load_base_model
from medtune.recipe import LoraConfig
from medtune.train import loss as loss_mod
from medtune.train.objectives.sft import loss_sum


def plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")


@pytest.mark.parametrize("n", [7, 64, 2 * 64 + 5])
def test_chunked_matches_plain(monkeypatch, n):
    monkeypatch.setattr(loss_mod, "CHUNK", 64)  # several chunks and a ragged last one
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=g)
    targets = torch.randint(0, 300, (n,), generator=g)
    h1 = torch.randn(n, 16, generator=g, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    a = loss_mod.chunked_cross_entropy_sum(h1, weight, targets)
    b = plain(h2, weight, targets)
    (a * 0.5).backward()
    (b * 0.5).backward()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)


def test_trainable_output_layer_is_refused():
    with pytest.raises(ValueError):
        loss_mod.chunked_cross_entropy_sum(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(3).long())


def test_loop_loss_same_with_and_without_chunking(tiny_model_dir):
    model = add_lora(load_base_model(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu")),
                     LoraConfig(r=4, dropout=0.0))
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(6, model.config.vocab_size, (n,), generator=g).tolist() for n in (30, 17))
    batch = pad_collate([Sample(a, [IGNORE] * 6 + a[6:], "t", 1), Sample(b, [IGNORE] * 4 + b[4:], "t", 2)], 0)
    grads = []
    losses = []
    for chunked in (True, False):
        model.zero_grad()
        loss = loss_sum(model, batch, torch.autocast("cpu", enabled=False), chunked=chunked)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)

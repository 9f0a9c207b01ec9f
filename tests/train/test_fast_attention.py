"""The training attention path (grouped k/v and one float mask per forward) against transformers' `sdpa`: same
loss and gradients on packed and padded batches, less saved for backward."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from medtune.data.batching import pack_collate, pad_collate
from medtune.data.render import IGNORE, Sample
from medtune.models import add_lora, load_base_model
from medtune.recipe import LoraConfig
from medtune.train import fast_attention
from medtune.train.objectives.sft import loss_sum

CPU = torch.device("cpu")


def samples(vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate((40, 23, 31, 12)):
        ids = torch.randint(6, vocab, (n,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE] * 3 + ids[3:], "t", i))
    return out


def run(model, b) -> tuple[float, list[torch.Tensor], int]:
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_sum(model, b, nullcontext())
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad], sum(storages.values())


@pytest.mark.parametrize("packed", [True, False])
def test_same_loss_and_gradients_as_sdpa(tiny_model_dir, packed):
    model = load_base_model(str(tiny_model_dir), dtype=torch.float32, device=CPU)
    model = add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0), fast=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    s = samples(model.config.vocab_size)
    b = pack_collate([s[:2], s[2:]], pad_id=0) if packed else pad_collate(s, pad_id=0)
    ref_loss, ref_grads, ref_bytes = run(model, b)
    assert fast_attention.install(model) and model.config._attn_implementation == fast_attention.NAME
    loss, grads, nbytes = run(model, b)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert nbytes < ref_bytes  # k/v at the key/value heads, one mask for all layers
    assert fast_attention.uninstall(model) and model.config._attn_implementation == "sdpa"


def block_causal(lengths: list[int]) -> torch.Tensor:
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    t = doc.numel()
    return ((doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril())[None, None]


def test_document_spans_of_packed_rows_and_nothing_else():
    mask = torch.cat([block_causal([3, 2, 4]), block_causal([9])])
    assert fast_attention.document_spans(mask) == [[(0, 3), (3, 5), (5, 9)], [(0, 9)]]
    padded = block_causal([9]).clone()
    padded[..., 7:] = False  # right padding: keys 7, 8 hidden from every query
    assert fast_attention.document_spans(padded) is None
    window = block_causal([9]) & torch.ones(9, 9, dtype=torch.bool).triu(-3)  # sliding window
    assert fast_attention.document_spans(window) is None


def test_per_document_attention_equals_masked_sdpa():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 8).requires_grad_()
    k = torch.randn(2, 2, 9, 8).requires_grad_()
    v = torch.randn(2, 2, 9, 8).requires_grad_()
    mask = torch.cat([block_causal([3, 2, 4]), block_causal([9])])
    module = torch.nn.Module()
    got, _ = fast_attention.sdpa_forward(module, q, k, v, mask, scaling=0.3)  # (B, T, H, D)
    assert "PerDocument" in type(got.grad_fn.next_functions[0][0]).__name__  # the per-document kernel calls ran
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3,
                                                           enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    w = torch.randn(ref.shape)
    for g, r in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v)),
                    strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)

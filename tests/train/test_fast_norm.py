"""The compact RMSNorm and SiLU-mul autograd functions against transformers' own modules: same outputs, same
gradients, fewer bytes saved for backward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from medtune.train import fast_norm

CONFIG = LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu")


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def outputs_and_grads(module, x, weights):
    x = x.detach().requires_grad_()
    out, nbytes = saved_bytes(lambda: module(x))
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out.float() * weights).sum(), [x, *params])
    return out, grads, nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable", [False, True])
def test_rmsnorm_matches_transformers(dtype, trainable):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(32, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32) * 0.5 + 1)
    norm.weight.requires_grad_(trainable)
    x = torch.randn(3, 7, 32).to(dtype) * 3
    w = torch.randn(3, 7, 32)
    ref, ref_grads, ref_bytes = outputs_and_grads(norm, x, w)
    assert fast_norm.install(norm) == 1
    got, got_grads, got_bytes = outputs_and_grads(norm, x, w)
    assert torch.equal(got, ref)  # the same forward arithmetic
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **tol)
    if dtype == torch.bfloat16:  # bf16 input + fp32 rstd instead of the fp32 copy of the input
        assert got_bytes < ref_bytes * 0.75
    assert fast_norm.uninstall(norm) == 1
    assert "forward" not in norm.__dict__


def test_silu_mul_mlp_matches_transformers():
    torch.manual_seed(0)
    mlp = LlamaMLP(CONFIG)
    mlp.down_proj.weight.requires_grad_(False)  # frozen, as under LoRA: only activations are saved for it
    x = torch.randn(2, 9, 32)
    w = torch.randn(2, 9, 32)
    ref, ref_grads, ref_bytes = outputs_and_grads(mlp, x, w)
    assert fast_norm.install(mlp) == 1
    got, got_grads, got_bytes = outputs_and_grads(mlp, x, w)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    intermediate = 2 * 9 * 80 * 4
    assert ref_bytes - got_bytes == intermediate  # silu(gate) is no longer kept


def test_other_activations_are_left_alone():
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="gelu"))
    assert fast_norm.install(mlp) == 0

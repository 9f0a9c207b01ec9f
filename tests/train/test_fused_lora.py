"""The fused LoRA linear against peft's own modules: same loss and gradients in fp32 without dropout; with dropout,
one mask per input tensor (shared by the projections that read it), checked against a hand-written reference."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from medtune.data.batching import pad_collate
from medtune.data.render import IGNORE, Sample
from medtune.models import add_lora, load_base_model
from medtune.recipe import LoraConfig
from medtune.train import fast_norm, fused_lora
from medtune.train.objectives.sft import loss_sum

CPU = torch.device("cpu")


def batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(6, vocab, (n,), generator=g).tolist() for n in (40, 23))
    return pad_collate([Sample(a, [IGNORE] * 8 + a[8:], "t", 1), Sample(b, [IGNORE] * 5 + b[5:], "t", 2)], pad_id=0)


def randomize_lora(model) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # B != 0 so gradients reach every A and every input
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in name else 0.1))


def loss_and_grads(model, b, autocast=None) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, b, autocast or nullcontext())
    (loss / b.num_loss_tokens).backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"])
def test_fused_equals_peft_in_fp32_without_dropout(tiny_model_dir, targets):
    model = load_base_model(str(tiny_model_dir), dtype=torch.float32, device=CPU)
    model = add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=targets), fast=False)
    randomize_lora(model)
    b = batch(model.config.vocab_size)
    ref_loss, ref = loss_and_grads(model, b)
    assert fused_lora.install(model) == (8 if targets != "all-linear" else 14)
    loss, got = loss_and_grads(model, b)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)
    assert fused_lora.uninstall(model) == (8 if targets != "all-linear" else 14)
    assert loss_and_grads(model, b)[0] == ref_loss  # peft's forward again, bit for bit


class QKVO(torch.nn.Module):
    """Four projections; the test calls q, k and v on one input and o on another."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(16, n, bias=bias) for n, bias in
                                                 ((16, True), (8, False), (8, False)))
        self.o_proj = torch.nn.Linear(16, 16, bias=False)


def test_one_dropout_mask_per_input_tensor():
    torch.manual_seed(0)
    model = get_peft_model(QKVO(), PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    randomize_lora(model)
    fused_lora.install(model)
    model.train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    h = torch.randn(3, 5, 16, requires_grad=True)
    layers = model.base_model.model
    shared = fused_lora.shared_dropout(layers.q_proj)
    outs = [layers.q_proj(x), layers.k_proj(x), layers.v_proj(x)]
    mask_x = shared.mask
    outs.append(layers.o_proj(h))
    mask_h = shared.mask
    assert 0.3 < mask_x.float().mean() < 0.7 and not torch.equal(mask_x, mask_h)

    def reference(name, inp, mask):
        layer = getattr(layers, name)
        a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return layer.base_layer(inp) + (inp * mask * 2.0) @ a.t() @ bb.t() * layer.scaling["default"]

    refs = [reference(n, x, mask_x) for n in ("q_proj", "k_proj", "v_proj")] + [reference("o_proj", h, mask_h)]
    for got, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    weights = [torch.randn(o.shape) for o in outs]
    params = [x, h] + [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights, strict=True)), params)
    ref = torch.autograd.grad(sum((o * w).sum() for o, w in zip(refs, weights, strict=True)), params)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_unfusable_calls_run_peft(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), dtype=torch.float32, device=CPU)
    model = add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0), fast=False)
    randomize_lora(model)
    b = batch(model.config.vocab_size)
    with torch.no_grad():
        with model.disable_adapter():
            base = loss_sum(model, b, nullcontext())
        tuned = loss_sum(model, b, nullcontext())
        fused_lora.install(model)
        with model.disable_adapter():
            assert loss_sum(model, b, nullcontext()) == base
        model.merge_adapter()
        torch.testing.assert_close(loss_sum(model, b, nullcontext()), tuned, atol=1e-4, rtol=1e-5)
        model.unmerge_adapter()


def test_bf16_autocast_gradients_match_fp32(tiny_model_dir):
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_base_model(str(tiny_model_dir), dtype=dtype, device=CPU)
        model = add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"),
                         autocast=dtype == torch.bfloat16, fast=dtype == torch.bfloat16)
        randomize_lora(model)
        b = batch(model.config.vocab_size)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else None
        grads[dtype] = loss_and_grads(model, b, ctx)[1]
    for name, ref in grads[torch.float32].items():
        got = grads[torch.bfloat16][name]
        assert got.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) >= 0.99, name


def test_input_recomputed_from_the_compact_norm_gives_the_same_gradients(tiny_model_dir):
    # With fast_norm's RMSNorm in front, q/k/v keep the norm's input and rstd (kept by the norm anyway) instead of
    # the normed x, and recompute x in backward: same masks (same seed), same gradients, fewer bytes saved.
    model = load_base_model(str(tiny_model_dir), dtype=torch.float32, device=CPU)
    model = add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.1), fast=False)
    randomize_lora(model)
    model.train()
    fused_lora.install(model)
    b = batch(model.config.vocab_size)

    def run():
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, grads = loss_and_grads(model, b)
        return loss, grads, sum(storages.values())

    ref_loss, ref, ref_bytes = run()
    assert fast_norm.install(model) > 0
    loss, got, nbytes = run()
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)
    c, n = model.config, b.input_ids.numel()
    silu_saving = c.num_hidden_layers * n * c.intermediate_size * 4  # fast_norm's MLP: silu(gate) not kept
    normed_x = n * c.hidden_size * 4  # per layer past the first (whose norm input needs no gradient, so is not kept)
    assert ref_bytes - nbytes >= silu_saving + (c.num_hidden_layers - 1) * normed_x - 1024


def test_train_mode_forward_under_inference_mode_runs_peft(tiny_model_dir):
    """Eval after training used to run with the model still in train mode under torch.inference_mode: the fused
    path's mask cache read `_version` of an inference tensor and raised. Without autograd peft's forward runs."""
    model = load_base_model(str(tiny_model_dir), dtype=torch.float32, device=CPU)
    model = add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.1), fast=True)
    randomize_lora(model)
    b = batch(model.config.vocab_size)
    model.train()
    with torch.inference_mode():
        fused = model(input_ids=b.input_ids).logits
    fused_lora.uninstall(model)
    with torch.inference_mode():
        torch.manual_seed(0)
        plain = model(input_ids=b.input_ids).logits
    assert fused.shape == plain.shape and torch.isfinite(fused).all()
    model.eval()
    with torch.inference_mode():
        ref = model(input_ids=b.input_ids).logits
    fused_lora.install(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=b.input_ids).logits, ref, atol=0, rtol=0)


def test_gradient_checkpointing_recomputes_the_same_masks(tiny_model_dir):
    # Checkpointing re-runs each layer's forward in backward with the RNG state restored: the fused layers must draw
    # the same shared masks again, so the gradients equal those of the run that kept its activations.
    grads = {}
    for ckpt in (False, True):
        model = load_base_model(str(tiny_model_dir), dtype=torch.float32, device=CPU)
        model = add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.3), gradient_checkpointing=ckpt)
        randomize_lora(model)
        model.train()
        torch.manual_seed(5)
        grads[ckpt] = loss_and_grads(model, batch(model.config.vocab_size))
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    for name, ref in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], ref, atol=1e-6, rtol=1e-5, msg=name)

"""QLoRA on CUDA: LoRA gradients through bitsandbytes' CUDA 4-bit kernels equal those of an fp32 model built from
the dequantised 4-bit weights (tests/test_qlora_cpu.py's check, on the GPU), also after the one-token eval forward
that generation makes (bitsandbytes then takes its `gemv_4bit` inference kernel), and with the bf16 compute dtype
that `quant.compute_dtype: auto` picks on a GPU."""

from __future__ import annotations

import pytest
import torch
from gpu_env import GPU
from safetensors.torch import load_file
from test_qlora_cpu import (
    LORA,
    QUANT,
    compare,
    dequantised_reference,
    fixed_batch,
    linear4bit_layers,
    lora_grads,
    lora_params,
    seed_lora,
    summary,
    tiny_llama_dir,  # noqa: F401  (a fixture)
)

from medtune.models import add_lora, load_base_model, pick_device
from medtune.recipe import QuantConfig

pytestmark = GPU
bnb = pytest.importorskip("bitsandbytes")
BF16_QUANT = QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="auto")


def cuda_qlora(model_dir: str, quant: QuantConfig, dtype: torch.dtype, autocast: bool = False):
    """medtune's QLoRA setup on the device `train.device: cuda` picks, with seeded adapter weights."""
    device = pick_device("cuda")
    model = load_base_model(model_dir, dtype=dtype, device=device, quant=quant)
    model = add_lora(model, LORA, quantized=True, autocast=autocast)
    seed_lora(model)
    layers = linear4bit_layers(model)
    assert len(layers) == 14, "7 projections x 2 layers in 4 bits"
    where = {p.device.type for p in model.parameters()} | {m.weight.device.type for m in layers}
    assert where == {"cuda"}, f"a QLoRA model for train.device=cuda has weights on {where}"
    return model


def reference_grads(model_dir: str, qmodel, batch) -> dict[str, torch.Tensor]:
    ref = dequantised_reference(model_dir, qmodel).to(batch.input_ids.device)
    grads = lora_grads(ref, batch)
    assert all(g.abs().sum() > 0 for g in grads.values()), "reference gradients must reach every LoRA tensor"
    return grads


def generation_forward(model, batch) -> None:
    """What `generate` does to the model between training steps (eval after_train, sample answers): an eval-mode
    forward of a prompt and then of one token with the cache, where bitsandbytes switches to its inference kernel."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch.input_ids[:1], use_cache=True)
        model(input_ids=batch.input_ids[:1, :1], past_key_values=out.past_key_values, use_cache=True)
    model.train()


def test_cuda_qlora_gradients_match_dequantised_fp32(tiny_llama_dir):  # noqa: F811
    batch = fixed_batch().to(pick_device("cuda"))
    model = cuda_qlora(tiny_llama_dir, QUANT, torch.float32)
    want = reference_grads(tiny_llama_dir, model, batch)

    generation_forward(model, batch)

    stats = compare(lora_grads(model, batch), want)
    print("cuda fp32 compute:", summary(stats))
    bad = {n: s for n, s in stats.items() if s[0] < 0.999 or s[1] > 1e-4}
    assert not bad, f"LoRA gradients through CUDA 4-bit kernels differ from the dequantised fp32 reference: {bad}"


def test_cuda_qlora_bf16_compute_gradients_agree_with_fp32(tiny_llama_dir):  # noqa: F811
    """The GPU default: bf16 compute dtype, bf16 autocast; the issue's bar for the fast path is cosine >= 0.99."""
    batch = fixed_batch().to(pick_device("cuda"))
    model = cuda_qlora(tiny_llama_dir, BF16_QUANT, torch.bfloat16, autocast=True)
    assert {m.compute_dtype for m in linear4bit_layers(model)} == {torch.bfloat16}
    want = reference_grads(tiny_llama_dir, model, batch)

    generation_forward(model, batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = lora_grads(model, batch)

    assert all(g.dtype == torch.float32 for g in got.values()), "LoRA gradients stay fp32"
    stats = compare(got, want)
    print("cuda bf16 compute:", summary(stats))
    assert min(c for c, _ in stats.values()) >= 0.99, summary(stats)


def test_cuda_qlora_training_steps_lower_the_loss(tiny_llama_dir):  # noqa: F811
    batch = fixed_batch().to(pick_device("cuda"))
    model = cuda_qlora(tiny_llama_dir, BF16_QUANT, torch.bfloat16, autocast=True)
    params = lora_params(model)
    start = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    got = []
    for _ in range(5):
        generation_forward(model, batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         labels=torch.where(batch.attention_mask.bool(), batch.input_ids, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        got.append(loss.item())
    assert all(torch.isfinite(torch.tensor(got))) and got[-1] < got[0] - 1e-3, got
    unchanged = [n for n, p in params.items() if torch.equal(p.detach(), start[n])]
    assert not unchanged, f"LoRA tensors that never moved: {unchanged}"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_4bit_weights_round_trip(tiny_llama_dir, quant_type):  # noqa: F811
    """Quantised on the GPU, the 4-bit weights dequantise to the checkpoint's within 4-bit rounding."""
    quant = QuantConfig(load_in_4bit=True, quant_type=quant_type, double_quant=True, compute_dtype="float32")
    model = load_base_model(tiny_llama_dir, dtype=torch.float32, device=pick_device("cuda"), quant=quant)
    stored = load_file(f"{tiny_llama_dir}/model.safetensors")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    for name, module in layers:
        assert module.weight.device.type == "cuda", name
        w = stored[f"{name}.weight"].cuda()
        dq = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        err = float((dq - w).abs().max() / w.abs().max())
        assert err < 0.2, f"{name}: {quant_type} round trip off by {err:.3f} of the largest weight"
        corr = float(torch.corrcoef(torch.stack([dq.flatten(), w.flatten()]))[0, 1])
        assert corr > 0.98, f"{name}: {quant_type} weights correlate {corr:.4f} with the checkpoint's"

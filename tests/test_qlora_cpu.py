"""QLoRA on CPU: LoRA gradients through bitsandbytes 4-bit layers must be right after an eval forward.

bitsandbytes 0.50 on an AVX512-BF16 CPU: the first no-grad eval-mode forward of a `Linear4bit`
(`nn/modules.py`, `Linear4bit.forward`) repacks its weight in place for a bf16 inference kernel and marks the
shared `QuantState` `packing_format_for_cpu=True`. From then on `matmul_4bit` (`autograd/_functions.py`)
always calls `gemv_4bit`, which has no autograd. `model.train()` does not undo this, so all later training
silently gets zero or wrong LoRA gradients. medtune turns the path off (`support_avx512bf16_for_cpu = False`,
`medtune.models.disable_bnb_cpu_inference_path`).

These tests compare the LoRA gradients of the guarded 4-bit model, taken after an eval forward, with those of an
fp32 model built from the dequantised 4-bit weights. They also show that the same check fails when the guard is
removed, and that evaluate() followed by training still learns.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from medtune.data.batching import Batch, pad_collate  # noqa: E402
from medtune.data.render import IGNORE, Sample  # noqa: E402
from medtune.models import add_lora, load_base_model  # noqa: E402
from medtune.recipe import LoraConfig, QuantConfig  # noqa: E402
from medtune.train.objectives import evaluate  # noqa: E402
from medtune.train.objectives.sft import loss_sum  # noqa: E402

CPU = torch.device("cpu")
QUANT = QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="float32")
LORA = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear")
PAD_ID = 0
NO_AUTOCAST = nullcontext()
GEMV_NO_AUTOGRAD = "ignore:.*gemv_4bit.*autograd kernel was not registered:UserWarning"  # torch's warning for the op with no backward


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A random 2-layer LLaMA whose linear dims (128, 256; kv 64) suit 4-bit blocks of 64 and 32-row packing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
                         max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def samples() -> list[Sample]:
    """Two sequences of different lengths (so one is padded), loss on the answer part only."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(1, 256, (14,), generator=g).tolist()
    b = torch.randint(1, 256, (9,), generator=g).tolist()
    return [Sample(a, [IGNORE] * 4 + a[4:], "test", 0), Sample(b, [IGNORE] * 3 + b[3:], "test", 1)]


def fixed_batch() -> Batch:
    return pad_collate(samples(), PAD_ID)


def linear4bit_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def seed_lora(model) -> None:
    """Deterministic LoRA weights with B ≠ 0, so gradients reach A and flow through every adapter."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in lora_params(model).items():
            assert "lora_" in name, name
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in name else 0.1))


def qlora_model(model_dir: str):
    """medtune's QLoRA setup: guarded 4-bit base + LoRA on all linear layers, seeded adapter weights."""
    model = load_base_model(model_dir, dtype=torch.float32, device=CPU, quant=QUANT)
    model = add_lora(model, LORA, quantized=True)
    seed_lora(model)
    assert len(linear4bit_layers(model)) == 14  # 7 projections x 2 layers; lm_head stays unquantised
    return model


def dequantised_reference(model_dir: str, qmodel):
    """An fp32 LoRA model whose base weights are exactly the dequantised 4-bit weights of `qmodel`, with the same
    other weights and the same LoRA weights. Must be built before any eval forward of `qmodel` (which may repack
    its 4-bit weights into a layout dequantize_4bit does not read)."""
    from transformers import LlamaForCausalLM

    base = qmodel.get_base_model()
    dequantised = {}
    for name, module in base.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
            dq = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dequantised[name.removesuffix(".base_layer") + ".weight"] = dq.float()

    ref = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = {}
    for name in ref.state_dict():  # not qmodel.state_dict(): that would also serialise the 4-bit quant states
        weights[name] = dequantised.pop(name) if name in dequantised else base.get_parameter(name).detach().float()
    assert not dequantised, f"dequantised weights with no place in the fp32 model: {sorted(dequantised)}"
    ref.load_state_dict(weights, strict=True)
    ref = add_lora(ref, LORA, quantized=False)
    ref_lora = lora_params(ref)
    q_lora = lora_params(qmodel)
    assert set(ref_lora) == set(q_lora)
    with torch.no_grad():
        for name, p in ref_lora.items():
            p.copy_(q_lora[name])
    ref.train()
    return ref


def lora_grads(model, batch: Batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (loss_sum(model, batch, NO_AUTOCAST) / batch.num_loss_tokens).backward()
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
            for n, p in lora_params(model).items()}


def eval_forward(model, batch: Batch) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    model.train()


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per-parameter (cosine similarity, max abs diff); cosine is 0 when either gradient is all zeros."""
    out = {}
    for name, w in want.items():
        g = got[name].flatten().double()
        w = w.flatten().double()
        denom = g.norm() * w.norm()
        cos = float(g @ w / denom) if denom > 0 else 0.0
        out[name] = (cos, float((g - w).abs().max()))
    return out


def summary(stats: dict[str, tuple[float, float]]) -> str:
    worst = min(stats, key=lambda n: stats[n][0])
    return (f"min cosine {stats[worst][0]:.6f} ({worst}), max abs diff {max(d for _, d in stats.values()):.3e}, "
            f"{sum(c < 0.99 for c, _ in stats.values())}/{len(stats)} params with cosine < 0.99")


@pytest.fixture(scope="module")
def reference_grads(tiny_llama_dir) -> dict[str, torch.Tensor]:
    qmodel = qlora_model(tiny_llama_dir)
    ref = dequantised_reference(tiny_llama_dir, qmodel)
    grads = lora_grads(ref, fixed_batch())
    assert all(g.abs().sum() > 0 for g in grads.values()), "reference gradients must reach every LoRA tensor"
    return grads


def test_guarded_qlora_gradients_match_dequantised_fp32_after_eval_forward(tiny_llama_dir, reference_grads):
    model = qlora_model(tiny_llama_dir)
    layers = linear4bit_layers(model)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers), "load_base_model/add_lora must guard"
    batch = fixed_batch()

    eval_forward(model, batch)

    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers), \
        "an eval forward repacked a guarded Linear4bit for the bf16 inference kernel"
    stats = compare(lora_grads(model, batch), reference_grads)
    print("guarded:", summary(stats))
    bad = {n: s for n, s in stats.items() if s[0] < 0.999 or s[1] > 1e-4}
    assert not bad, f"LoRA gradients differ from the dequantised fp32 reference: {bad}"


@pytest.mark.filterwarnings(GEMV_NO_AUTOGRAD)
def test_unguarded_eval_forward_breaks_qlora_gradients(tiny_llama_dir, reference_grads):
    """Proves the check above can fail: re-enable bitsandbytes' CPU inference path and the gradients go wrong."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no fast bf16 (oneDNN), so bitsandbytes has no AVX512-BF16 inference path here")
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes' native library reports no AVX512-BF16, so its CPU inference path is off")
    model = qlora_model(tiny_llama_dir)
    layers = linear4bit_layers(model)
    for m in layers:
        m.support_avx512bf16_for_cpu = True  # undo medtune's guard
    batch = fixed_batch()

    eval_forward(model, batch)

    if not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers):
        pytest.skip("bitsandbytes did not switch Linear4bit to its CPU inference path: the bug does not reproduce")
    # model.train() (inside eval_forward) did not undo it: the repack is sticky.
    assert all(m.training and m.weight.quant_state.packing_format_for_cpu for m in layers)
    stats = compare(lora_grads(model, batch), reference_grads)
    print("unguarded:", summary(stats))
    assert min(c for c, _ in stats.values()) < 0.99, \
        f"expected wrong LoRA gradients without the guard, got {summary(stats)}"


def test_evaluate_then_training_updates_lora_and_lowers_loss(tiny_llama_dir, reference_grads):
    """medtune's own evaluate() (eval mode, no grad: the trigger) and then 5 AdamW steps on one batch."""
    model = qlora_model(tiny_llama_dir)
    data = samples()
    before = evaluate(model, data, pad_id=PAD_ID, batch_size=2, autocast=NO_AUTOCAST)
    assert before["eval_tokens"] == sum(s.num_loss_tokens for s in data)
    assert model.training, "evaluate() must restore train mode"

    params = lora_params(model)
    start = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    batch = fixed_batch()
    losses = []
    for step in range(5):
        loss = loss_sum(model, batch, NO_AUTOCAST) / batch.num_loss_tokens
        loss.backward()
        if step == 0:
            stats = compare({n: p.grad for n, p in params.items()}, reference_grads)
            assert min(c for c, _ in stats.values()) >= 0.999, f"first step after evaluate(): {summary(stats)}"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    unchanged = [n for n, p in params.items() if torch.equal(p.detach(), start[n])]
    assert not unchanged, f"LoRA tensors that never moved: {unchanged}"
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 1e-3, losses
    assert abs(losses[0] - before["eval_loss"]) < 1e-4, (losses[0], before["eval_loss"])
    after = evaluate(model, data, pad_id=PAD_ID, batch_size=2, autocast=NO_AUTOCAST)
    assert after["eval_loss"] < before["eval_loss"]

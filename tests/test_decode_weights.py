"""bf16 copies for one-token decoding steps (medtune.decode_weights): which products use them, exactly what they
compute, what they leave alone (multi-row products, gradients, the state dict), and when inference loading adds
them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import medtune.generate as gen
from medtune.decode_weights import DecodeLinear, add_decode_copies, decode_copies_pay_off


def linear_with_copy() -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 40)
    fast = torch.nn.Linear(48, 40)
    fast.load_state_dict(plain.state_dict())
    assert add_decode_copies(fast) == 1 and type(fast) is DecodeLinear
    return plain, fast


@torch.no_grad()
def test_one_or_two_rows_multiply_by_the_bf16_copy_more_rows_by_fp32():
    plain, fast = linear_with_copy()
    for rows in (1, 2):
        x = torch.randn(1, rows, 48)
        want = F.linear(x.bfloat16(), plain.weight.bfloat16(), plain.bias.bfloat16()).float()
        got = fast(x)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert not torch.equal(got, plain(x))  # the copy really ran
        torch.testing.assert_close(got, plain(x), atol=0.05, rtol=0.02)  # bf16 rounding, nothing worse
    x = torch.randn(2, 2, 48)  # four rows: the prompt, a batch
    assert torch.equal(fast(x), plain(x))


def test_gradients_and_the_state_dict_never_see_the_copy():
    plain, fast = linear_with_copy()
    x = torch.randn(1, 1, 48, requires_grad=True)
    assert torch.equal(fast(x), plain(x))  # grad enabled: the fp32 weights
    fast(x).sum().backward()
    assert fast.weight.grad is not None
    assert fast.state_dict().keys() == plain.state_dict().keys() == {"weight", "bias"}


@torch.no_grad()
def test_a_model_gets_copies_on_every_linear_and_keeps_its_prompt_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    prompt_before, step_before = model(ids).logits, model(ids[:, :1]).logits
    keys = model.state_dict().keys()
    assert add_decode_copies(model) == linears == 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + LM head
    assert torch.equal(model(ids).logits, prompt_before)
    step = model(ids[:, :1]).logits
    assert not torch.equal(step, step_before)
    torch.testing.assert_close(step, step_before, atol=0.05, rtol=0.05)
    assert model.state_dict().keys() == keys
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the tied embedding stays fp32


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_inference_loading_adds_copies_only_for_decoding_without_fast_bf16(tiny_model_dir, monkeypatch, fast_bf16):
    monkeypatch.setattr(gen, "bf16_supported", lambda device: fast_bf16)
    decoding = gen.load_for_inference(str(tiny_model_dir), device="cpu", for_decoding=True)
    scoring = gen.load_for_inference(str(tiny_model_dir), device="cpu")
    exact = gen.load_for_inference(str(tiny_model_dir), device="cpu", precision="fp32", for_decoding=True)
    has_copies = [any(type(m) is DecodeLinear for m in x.model.modules()) for x in (decoding, scoring, exact)]
    assert has_copies == [not fast_bf16, False, False]
    assert decode_copies_pay_off(torch.device("cpu"), False) and not decode_copies_pay_off(torch.device("cpu"), True)
    assert not decode_copies_pay_off(torch.device("cuda"), False)
    answer = gen.generate(decoding, gen.user_turn("What is gout?"), max_new_tokens=6)
    assert isinstance(answer, str)

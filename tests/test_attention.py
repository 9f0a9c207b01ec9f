"""Packed attention (one causal SDPA per document, no 4D mask) against transformers' sdpa with its
block-diagonal mask: same logits and gradients on packed rows, and the sdpa path for padding and generation."""

from __future__ import annotations

import pytest
import torch

from medtune.attention import NAME, document_bounds
from medtune.data.batching import pack_collate, pad_collate
from medtune.data.render import Sample

TEXTS = ["What is a fever?", "Rest, drink plenty of water and see a doctor if the cough gets worse.",
         "Anemia is a lack of healthy red blood cells.", "Bursitis is inflammation of a bursa."]


def test_document_bounds():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert document_bounds(pos) == [[(0, 3), (3, 5), (5, 9)], [(0, 9)]]
    assert document_bounds(torch.tensor([[5, 6, 7, 0]])) == [[(0, 3), (3, 4)]]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import medtune.attention  # noqa: F401  (registers NAME)

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    load = lambda impl: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,  # noqa: E731
                                                             attn_implementation=impl)
    samples = [Sample(ids, ids, "f", n) for n, ids in enumerate((tok(t)["input_ids"] for t in TEXTS), start=1)]
    return load("sdpa"), load(NAME), samples


def _logits_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False).logits  # (B, T, V)
    (logits.float().square().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_rows_match_sdpa_with_its_block_mask(models):
    sdpa, packed, samples = models
    batch = pack_collate([samples[:2], samples[2:]], pad_id=0)  # two rows of two documents each
    assert batch.attention_mask is None and len(document_bounds(batch.position_ids)[1]) == 2
    ref_logits, ref_grads = _logits_and_grads(sdpa, batch)
    out_logits, out_grads = _logits_and_grads(packed, batch)
    torch.testing.assert_close(out_logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(out_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_padded_batches_take_the_sdpa_path(models):
    sdpa, packed, samples = models
    for side in ("left", "right"):
        batch = pad_collate(samples[:3], pad_id=0, side=side)
        assert batch.attention_mask is not None and not bool(batch.attention_mask.all())
        real = batch.attention_mask.bool()
        ref, _ = _logits_and_grads(sdpa, batch)
        out, _ = _logits_and_grads(packed, batch)
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_generation_with_a_cache_is_unchanged(models):
    sdpa, packed, samples = models
    ids = torch.tensor([samples[1].input_ids])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert packed.generate(input_ids=ids, **kw).tolist() == sdpa.generate(input_ids=ids, **kw).tolist()

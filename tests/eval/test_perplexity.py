"""Perplexity against plain reference computations on the tiny LLaMA: whole texts (one forward each, full
logits) and sliding windows (one window at a time), loss-bearing tokens or all tokens, batched or not."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from medtune.data.render import IGNORE, Sample
from medtune.errors import MedtuneError
from medtune.eval.perplexity import perplexity, windows
from medtune.generate import load_for_inference


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_inference(str(tiny_model_dir), precision="fp32")


def make_samples(vocab: int, lengths: list[int], seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for n, length in enumerate(lengths):
        ids = [rng.randrange(6, vocab) for _ in range(length)]
        prompt = length // 3  # the first third is "prompt": no loss
        out.append(Sample(ids, [IGNORE] * prompt + ids[prompt:], "test", n + 1))
    return out


def reference(model, samples, window, stride, all_tokens=False):
    """The plain way: each window on its own, full logits, score the targets the previous window did not reach."""
    nll, count = 0.0, 0
    for s in samples:
        ids = torch.tensor(s.input_ids)
        labels = torch.tensor(s.input_ids if all_tokens else s.labels)
        n, prev_end, end = len(ids), 0, min(window, len(ids))
        while True:
            begin = max(0, end - window)
            with torch.no_grad():
                logits = model(ids[begin:end][None]).logits[0].float()  # (T, V)
            targets = labels[begin + 1:end].clone()  # (T-1,)
            positions = torch.arange(begin + 1, end)
            targets[positions < max(prev_end, 1)] = IGNORE
            nll += F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE, reduction="sum").item()
            count += int((targets != IGNORE).sum())
            if end == n:
                break
            prev_end, end = end, min(end + stride, n)
    return math.exp(nll / count), count


@pytest.mark.parametrize(("window", "stride", "all_tokens"), [(512, 256, False), (512, 256, True), (40, 16, False),
                                                              (40, 39, True), (33, 7, False)])
def test_matches_reference(loaded, window, stride, all_tokens):
    samples = make_samples(len(loaded.tok), [12, 57, 130, 25, 90])
    want, tokens = reference(loaded.model, samples, window, stride, all_tokens)
    got = perplexity(loaded, samples, window=window, stride=stride, batch_size=3, all_tokens=all_tokens,
                     progress=False)
    assert got.tokens == tokens
    assert got.perplexity == pytest.approx(want, rel=1e-4)
    assert got.perplexity == pytest.approx(perplexity(loaded, samples, window=window, stride=stride, batch_size=1,
                                                      all_tokens=all_tokens, progress=False).perplexity, rel=1e-5)


def test_stride_must_leave_context():
    with pytest.raises(MedtuneError):
        windows(make_samples(100, [50]), window=20, stride=20)


def test_every_target_scored_once():
    s = make_samples(100, [101])[0]
    wins = windows([s], window=30, stride=11)
    assert all(len(w.input_ids) <= 30 for w in wins)
    scored = sum(sum(t != IGNORE for t in w.targets) for w in wins)
    assert scored == s.num_loss_tokens


def test_whole_text_equals_model_loss(loaded):
    """A text shorter than the window with every token scored: exactly the model's own mean loss."""
    s = make_samples(len(loaded.tok), [64])[0]
    ids = torch.tensor([s.input_ids])
    with torch.no_grad():
        loss = loaded.model(ids, labels=ids).loss.item()
    got = perplexity(loaded, [s], window=128, all_tokens=True, progress=False)
    assert got.loss == pytest.approx(loss, rel=1e-5) and got.tokens == 63

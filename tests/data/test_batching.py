"""Batching: padding and packing with exact tensors, bin packing properties, batch plans, and packed == alone
on the real tiny LLaMA."""

from __future__ import annotations

import random

import pytest
import torch

from medtune.data.batching import BatchPlan, iterate, pack_bins, pack_collate, pad_collate
from medtune.data.render import IGNORE, Sample

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # not in the dev extra yet
    given = None

X = IGNORE
A = Sample([1, 11, 12, 13], [X, X, 12, 13], "a.jsonl", 1)
B = Sample([1, 21], [X, 21], "a.jsonl", 2)
C = Sample([1, 31, 32], [X, 31, 32], "a.jsonl", 3)


def test_pad_collate_right():
    batch = pad_collate([A, B], pad_id=0, side="right")
    assert batch.input_ids.tolist() == [[1, 11, 12, 13], [1, 21, 0, 0]]
    # targets[t] is the token position t must predict; the last real token and the pads predict nothing.
    assert batch.targets.tolist() == [[X, 12, 13, X], [21, X, X, X]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 1, 1]]
    assert batch.num_loss_tokens == 3
    assert batch.num_tokens == 6


def test_pad_collate_left():
    batch = pad_collate([A, B], pad_id=5, side="left")
    assert batch.input_ids.tolist() == [[1, 11, 12, 13], [5, 5, 1, 21]]
    assert batch.targets.tolist() == [[X, 12, 13, X], [X, X, 21, X]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert batch.num_loss_tokens == 3
    assert batch.num_tokens == 6


def test_pad_collate_tensors_are_long():
    batch = pad_collate([A, B], pad_id=0)
    assert {t.dtype for t in (batch.input_ids, batch.targets, batch.position_ids)} == {torch.long}


def test_pack_collate_three_samples():
    batch = pack_collate([[A, B, C]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 11, 12, 13, 1, 21, 1, 31, 32]]
    # No sample's last token predicts the next sample's first.
    assert batch.targets.tolist() == [[X, 12, 13, X, 21, X, 31, 32, X]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert batch.attention_mask is None
    assert batch.num_loss_tokens == 5
    assert batch.num_tokens == 9
    moved = batch.to(torch.device("cpu"))
    assert moved.attention_mask is None and torch.equal(moved.position_ids, batch.position_ids)


def test_pack_collate_rows_are_padded_as_their_own_segment():
    batch = pack_collate([[A, B], [C]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 11, 12, 13, 1, 21], [1, 31, 32, 0, 0, 0]]
    assert batch.targets.tolist() == [[X, 12, 13, X, 21, X], [31, 32, X, X, X, X]]
    # The padding restarts at 0, so it forms its own block of the block-diagonal mask.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert batch.attention_mask is None
    assert batch.num_loss_tokens == 5 and batch.num_tokens == 9


def test_pack_bins_best_fit_decreasing():
    # Largest first, each into the fullest bin it fits: 6 | 5 | 4, then 3 joins the 5, and 2 joins the 6.
    assert pack_bins([5, 3, 4, 2, 6], capacity=8) == [[4, 3], [0, 1], [2]]
    assert pack_bins([], capacity=8) == []
    assert pack_bins([8, 8], capacity=8) == [[0], [1]]


def check_bins(lengths: list[int], capacity: int) -> None:
    bins = pack_bins(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every index exactly once
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(b for b in bins) and all(load <= capacity for load in loads)
    # Best fit never leaves two bins at most half full: the second one's first item would have fit the first.
    assert sum(1 for load in loads if 2 * load <= capacity) <= 1


def test_pack_bins_properties_on_random_inputs():
    rng = random.Random(0)
    for _ in range(300):
        capacity = rng.randint(1, 300)
        check_bins([rng.randint(1, capacity) for _ in range(rng.randint(0, 80))], capacity)


if given is not None:
    @settings(max_examples=300, deadline=None)
    @given(st.integers(1, 512).flatmap(lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=80))))
    def test_pack_bins_properties_hypothesis(case):
        capacity, lengths = case
        check_bins(lengths, capacity)
else:
    @pytest.mark.skip(reason="hypothesis is not installed (add it to the dev extra)")
    def test_pack_bins_properties_hypothesis():
        pass


_rng = random.Random(1)
LENGTHS = [_rng.randint(1, 200) for _ in range(203)]


@pytest.mark.parametrize("kind", [{}, {"group_by_length": True}, {"packing": True, "max_length": 256}])
def test_batch_plan_is_deterministic_and_covers_everything(kind):
    plan = BatchPlan(LENGTHS, batch_size=8, seed=3, **kind)
    again = BatchPlan(LENGTHS, batch_size=8, seed=3, **kind)
    assert plan.batches(0) == again.batches(0) and plan.batches(1) == again.batches(1)
    assert plan.batches(0) != plan.batches(1)
    assert BatchPlan(LENGTHS, batch_size=8, seed=4, **kind).batches(0) != plan.batches(0)
    for epoch in range(3):
        batches = plan.batches(epoch)
        assert len(plan) == len(batches)
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))


def test_batch_plan_sizes():
    assert len(BatchPlan(LENGTHS, batch_size=8, seed=0)) == 26  # 203 rows: 25 full batches and one of 3
    assert [len(b) for b in BatchPlan(LENGTHS, batch_size=8, seed=0).batches(0)] == [8] * 25 + [3]
    packed = BatchPlan(LENGTHS, batch_size=2, seed=0, packing=True, max_length=256)
    bins = pack_bins(LENGTHS, 256)
    assert len(packed) == (len(bins) + 1) // 2
    for batch in packed.batches(0):
        assert sum(LENGTHS[i] for i in batch) <= 2 * 256


def padding(plan: BatchPlan, epoch: int) -> int:
    return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in plan.batches(epoch))


def test_group_by_length_pads_less_than_random_order():
    for seed in range(3):
        grouped = padding(BatchPlan(LENGTHS, batch_size=8, seed=seed, group_by_length=True), 0)
        shuffled = padding(BatchPlan(LENGTHS, batch_size=8, seed=seed), 0)
        assert grouped * 4 < shuffled


def test_iterate_collates_the_plan_and_skips_for_resume():
    samples = [Sample([1] + [7] * (n - 1), [X] + [7] * (n - 1), "f", i + 1) for i, n in enumerate([3, 5, 2, 4, 6])]
    plan = BatchPlan([len(s.input_ids) for s in samples], batch_size=2, seed=0)
    batches = list(iterate(samples, plan, epoch=1, pad_id=0, side="right"))
    assert len(batches) == 3
    for idx, batch in zip(plan.batches(1), batches, strict=True):
        assert torch.equal(batch.input_ids, pad_collate([samples[i] for i in idx], 0).input_ids)
    resumed = list(iterate(samples, plan, epoch=1, pad_id=0, side="right", skip=2))
    assert len(resumed) == 1 and torch.equal(resumed[0].input_ids, batches[2].input_ids)
    packed_plan = BatchPlan([len(s.input_ids) for s in samples], batch_size=2, seed=0, packing=True, max_length=9)
    for rows, batch in zip(packed_plan.rows(0), iterate(samples, packed_plan, epoch=0, pad_id=0, side="right"),
                           strict=True):
        assert batch.input_ids.shape[0] == len(rows) <= 2 and batch.attention_mask is None
        assert batch.input_ids.shape[1] <= 9


# ---- packing on the real tiny model --------------------------------------------------------------------------

SENTENCES = ["What is a fever?", "Rest, drink plenty of water and see a doctor if the cough gets worse.",
             "Anemia is a lack of healthy red blood cells."]


@pytest.fixture(scope="module")
def model_and_samples(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    samples = [Sample(ids, ids, "f", n) for n, ids in enumerate((tok(s)["input_ids"] for s in SENTENCES), start=1)]
    assert len({len(s.input_ids) for s in samples}) == 3
    return model, samples


def alone_logits(model, sample: Sample) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([sample.input_ids]), use_cache=False).logits[0]


def test_packed_row_gives_the_logits_of_each_sequence_alone(model_and_samples):
    model, samples = model_and_samples
    batch = pack_collate([samples], pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
    start = 0
    for s in samples:
        n = len(s.input_ids)
        torch.testing.assert_close(packed[start: start + n], alone_logits(model, s), atol=1e-5, rtol=0)
        start += n
    assert start == packed.shape[0]


def test_packed_row_without_restarting_positions_mixes_sequences(model_and_samples):
    # Sanity: the test above can fail. With plain 0..T-1 positions nothing separates the sequences.
    model, samples = model_and_samples
    batch = pack_collate([samples], pad_id=0)
    arange = torch.arange(batch.input_ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        mixed = model(input_ids=batch.input_ids, position_ids=arange, use_cache=False).logits[0]
    n0, n1 = len(samples[0].input_ids), len(samples[1].input_ids)
    assert (mixed[n0: n0 + n1] - alone_logits(model, samples[1])).abs().max() > 1e-3


def test_packed_row_needs_use_cache_false(model_and_samples):
    # transformers only derives the block-diagonal mask from position ids when no cache is passed; with the
    # default use_cache=True it builds one, and packed sequences attend to each other. The training loop must
    # call the model with use_cache=False.
    model, samples = model_and_samples
    batch = pack_collate([samples], pad_id=0)
    with torch.no_grad():
        cached = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits[0]
    n0, n1 = len(samples[0].input_ids), len(samples[1].input_ids)
    assert (cached[n0: n0 + n1] - alone_logits(model, samples[1])).abs().max() > 1e-3


def test_packed_rows_with_padding_give_each_sequence_alone(model_and_samples):
    model, samples = model_and_samples
    batch = pack_collate([[samples[0], samples[1]], [samples[2]]], pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    n0, n1, n2 = (len(s.input_ids) for s in samples)
    torch.testing.assert_close(packed[0, :n0], alone_logits(model, samples[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, n0: n0 + n1], alone_logits(model, samples[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1, :n2], alone_logits(model, samples[2]), atol=1e-5, rtol=0)

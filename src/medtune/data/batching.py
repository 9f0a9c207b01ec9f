"""Samples → micro-batches: plain padding, group-by-length, or packing.

Targets are shifted here, per sample (`targets[t]` is the token that position t must predict), so that
packing several samples into one row can never make a sample's last token predict the next sample's first.

Packing: samples are placed into bins of at most `max_length` tokens (best-fit decreasing); each bin is one
row, with position ids restarting at 0 for each sample, and a micro-batch is `batch_size` rows. With no
attention mask and restarting position ids, transformers builds a block-diagonal causal mask (only when the
model is called with `use_cache=False`), so no token attends across samples. Rows of `max_length`, not one
long row: attention cost grows with the square of the row length.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from medtune.data.render import IGNORE, Feedback, Pair, Sample


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), IGNORE where no loss
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T); None when packed (position ids carry the boundaries)
    num_loss_tokens: int
    num_tokens: int  # real (non-pad) tokens

    def to(self, device: torch.device) -> Batch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(self.input_ids.to(device), self.targets.to(device), self.position_ids.to(device), mask,
                     self.num_loss_tokens, self.num_tokens)


def shifted_targets(s: Sample) -> list[int]:
    return s.labels[1:] + [IGNORE]


def pad_collate(samples: list[Sample], pad_id: int, side: str = "right") -> Batch:
    width = max(len(s.input_ids) for s in samples)
    ids, tgt, mask = [], [], []
    for s in samples:
        n = width - len(s.input_ids)
        pad_ids, pad_tgt, pad_mask = [pad_id] * n, [IGNORE] * n, [0] * n
        real_mask = [1] * len(s.input_ids)
        if side == "right":
            ids.append(s.input_ids + pad_ids), tgt.append(shifted_targets(s) + pad_tgt), mask.append(real_mask + pad_mask)
        else:
            ids.append(pad_ids + s.input_ids), tgt.append(pad_tgt + shifted_targets(s)), mask.append(pad_mask + real_mask)
    attention = torch.tensor(mask)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    targets = torch.tensor(tgt)
    return Batch(torch.tensor(ids), targets, position_ids, attention, int((targets != IGNORE).sum()),
                 int(attention.sum()))


def pair_collate(pairs: list[Pair], pad_id: int, side: str = "right") -> Batch:
    """Preference pairs as one batch of 2N rows: the N chosen answers, then the N rejected ones, in pair order."""
    return pad_collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, side)


@dataclass
class FeedbackBatch(Batch):
    """format=feedback (KTO): the N (prompt, answer) rows as a Batch, each answer's verdict, and the KL batch (the
    same prompts with mismatched answers, `mismatched`) from which KTO estimates its reference point.
    num_loss_tokens and num_tokens count the N rows only."""

    labels: torch.Tensor  # (N,) bool: True = desirable
    kl: Batch  # (N, T') rows: prompt i with answer i-1

    def to(self, device: torch.device) -> FeedbackBatch:
        return FeedbackBatch(**vars(super().to(device)), labels=self.labels.to(device), kl=self.kl.to(device))


def answer_start(s: Sample) -> int:
    """Position of a sample's first answer token: its first label after position 0 (which nothing predicts)."""
    return next(i for i in range(1, len(s.labels)) if s.labels[i] != IGNORE)


def mismatched(samples: list[Sample], max_length: int | None = None) -> list[Sample]:
    """KTO's KL rows, as TRL 1.16 builds them: the answers rotated by one within the batch, so that row i is prompt i
    with answer i-1 and row 0 takes the last answer: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}). An answer is its
    sample from the first answer token to the end, labels and all; a row longer than max_length is cut there, as
    TRL's collator cuts it."""
    starts = [answer_start(s) for s in samples]
    rows = []
    for i, s in enumerate(samples):
        answer, at = samples[i - 1], starts[i - 1]
        ids = s.input_ids[: starts[i]] + answer.input_ids[at:]
        labels = [IGNORE] * starts[i] + answer.labels[at:]
        rows.append(Sample(ids[:max_length], labels[:max_length], s.source, s.row))
    return rows


def feedback_collate(items: list[Feedback], pad_id: int, side: str = "right",
                     max_length: int | None = None) -> FeedbackBatch:
    """Feedback rows (KTO) as one padded batch, their labels, and their KL batch (`mismatched`), padded alike."""
    samples = [f.sample for f in items]
    kl = pad_collate(mismatched(samples, max_length), pad_id, side)
    return FeedbackBatch(**vars(pad_collate(samples, pad_id, side)), labels=torch.tensor([f.label for f in items]),
                         kl=kl)


def pack_collate(rows: list[list[Sample]], pad_id: int) -> Batch:
    """Each row: its samples end to end, positions restarting per sample; rows padded at the end to the longest
    (the padding is one more segment with its own positions, so it attends only to itself, and has no targets)."""
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    ids, tgt, pos = [], [], []
    for row in rows:
        r_ids, r_tgt, r_pos = [], [], []
        for s in row:
            r_ids += s.input_ids
            r_tgt += shifted_targets(s)
            r_pos += range(len(s.input_ids))
        n = width - len(r_ids)
        ids.append(r_ids + [pad_id] * n), tgt.append(r_tgt + [IGNORE] * n), pos.append(r_pos + list(range(n)))
    targets = torch.tensor(tgt)
    real = sum(len(s.input_ids) for row in rows for s in row)
    return Batch(torch.tensor(ids), targets, torch.tensor(pos), None, int((targets != IGNORE).sum()), real)


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices grouped so each group's total length ≤ capacity; O(n log n)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (room - lengths[i], b))
    return bins


@dataclass
class BatchPlan:
    """Which samples form each micro-batch in a given epoch; deterministic in (seed, epoch)."""

    lengths: list[int]
    batch_size: int
    seed: int
    packing: bool = False
    group_by_length: bool = False
    max_length: int = 512

    def __post_init__(self) -> None:
        self._bins = pack_bins(self.lengths, self.max_length) if self.packing else None

    def rows(self, epoch: int) -> list[list[list[int]]]:
        """Micro-batches as rows of sample indices: one sample per row, or a packed bin per row."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.packing:
            bins = list(self._bins)
            rng.shuffle(bins)
            return [bins[i: i + self.batch_size] for i in range(0, len(bins), self.batch_size)]
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.group_by_length:
            # Sort inside mega-batches of 50 batches: similar lengths share a batch, order stays random.
            mega = self.batch_size * 50
            order = [i for k in range(0, len(order), mega)
                     for i in sorted(order[k: k + mega], key=lambda i: -self.lengths[i])]
            chunks = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            rng.shuffle(chunks)
        else:
            chunks = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [[[i] for i in chunk] for chunk in chunks]

    def batches(self, epoch: int) -> list[list[int]]:
        """The sample indices of each micro-batch."""
        return [[i for row in batch for i in row] for batch in self.rows(epoch)]

    def __len__(self) -> int:
        n = len(self._bins) if self.packing else len(self.lengths)
        return -(-n // self.batch_size)


def iterate(samples: list[Sample] | list[Pair] | list[Feedback], plan: BatchPlan, epoch: int, pad_id: int, side: str,
            skip: int = 0) -> Iterator[Batch]:
    """Micro-batches of one epoch, skipping the first `skip` (resume)."""
    for rows in plan.rows(epoch)[skip:]:
        if plan.packing:
            yield pack_collate([[samples[i] for i in row] for row in rows], pad_id)
        elif isinstance(samples[rows[0][0]], Pair):
            yield pair_collate([samples[row[0]] for row in rows], pad_id, side)
        elif isinstance(samples[rows[0][0]], Feedback):
            yield feedback_collate([samples[row[0]] for row in rows], pad_id, side, plan.max_length)
        else:
            yield pad_collate([samples[row[0]] for row in rows], pad_id, side)

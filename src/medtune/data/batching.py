"""Samples → micro-batches: plain padding, group-by-length, or padding-free packing.

Targets are shifted here, per sample (`targets[t]` is the token that position t must predict), so that
packing several samples into one row can never make a sample's last token predict the next sample's first.

Packing is padding-free: samples are placed into bins of at most `max_length` tokens (first-fit
decreasing), and the `batch_size` bins of a micro-batch are laid end to end in ONE row of shape (1, T),
with position ids restarting at 0 for each sample. transformers turns restarting position ids into a
block-diagonal causal mask, so no token attends across samples.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from medtune.data.render import IGNORE, Sample


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), IGNORE where no loss
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T); None when packed (position ids carry the boundaries)
    num_loss_tokens: int

    def to(self, device: torch.device) -> Batch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(self.input_ids.to(device), self.targets.to(device), self.position_ids.to(device), mask,
                     self.num_loss_tokens)

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.input_ids.numel() if self.attention_mask is None else self.attention_mask.sum())


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
    return Batch(torch.tensor(ids), targets, position_ids, attention, int((targets != IGNORE).sum()))


def pack_collate(samples: list[Sample]) -> Batch:
    ids, tgt, pos = [], [], []
    for s in samples:
        ids += s.input_ids
        tgt += shifted_targets(s)
        pos += range(len(s.input_ids))
    targets = torch.tensor([tgt])
    return Batch(torch.tensor([ids]), targets, torch.tensor([pos]), None, int((targets != IGNORE).sum()))


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

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.packing:
            bins = list(self._bins)
            rng.shuffle(bins)
            return [sum(bins[i: i + self.batch_size], []) for i in range(0, len(bins), self.batch_size)]
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.group_by_length:
            # Sort inside mega-batches of 50 batches: similar lengths share a batch, order stays random.
            mega = self.batch_size * 50
            order = [i for k in range(0, len(order), mega)
                     for i in sorted(order[k: k + mega], key=lambda i: -self.lengths[i])]
            chunks = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            rng.shuffle(chunks)
            return chunks
        return [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def __len__(self) -> int:
        n = len(self._bins) if self.packing else len(self.lengths)
        return -(-n // self.batch_size)


def iterate(samples: list[Sample], plan: BatchPlan, epoch: int, pad_id: int, side: str,
            skip: int = 0) -> Iterator[Batch]:
    """Micro-batches of one epoch, skipping the first `skip` (resume)."""
    for idx in plan.batches(epoch)[skip:]:
        group = [samples[i] for i in idx]
        yield pack_collate(group) if plan.packing else pad_collate(group, pad_id, side)

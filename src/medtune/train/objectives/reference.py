"""Reference log-probs computed once (train.precompute_reference, dpo): every training pair's chosen and rejected
answer under the base model (the adapter switched off), before the first step, so that a step runs one forward
pass fewer. The reference never changes while the adapter trains, so the table is exact, not an approximation.

The table is computed in the plan's first epoch order with the training batches themselves (same rows, same
padding), so the first epoch's reference is bit for bit the per-step one; later epochs differ only by padding
(~1e-6 in fp32). Resume computes it again (it is not saved with the checkpoints): no stale table, ever.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medtune.data.batching import Batch, BatchPlan, iterate
from medtune.data.render import Pair


@dataclass
class ReferencedBatch(Batch):
    """A batch of pairs with its rows' reference log-probs (summed over each answer), in the batch's row order."""

    reference: torch.Tensor  # (2N,): the N chosen answers, then the N rejected ones (pair_collate's order)

    def to(self, device: torch.device) -> ReferencedBatch:
        return ReferencedBatch(**vars(super().to(device)), reference=self.reference.to(device))


@dataclass
class ReferenceTable:
    """Reference log-probs of every training pair, keyed by pair index."""

    table: torch.Tensor  # (P, 2) fp32 on the CPU: column 0 the chosen answer's, column 1 the rejected one's

    def attach(self, batch: Batch, pairs: list[int]) -> ReferencedBatch:
        """`batch`: pair_collate of the pairs `pairs`, in that order."""
        return ReferencedBatch(**vars(batch), reference=self.table[pairs].T.reshape(-1))


def precompute_reference(objective, model, pairs: list[Pair], plan: BatchPlan, pad_id: int, side: str, autocast,
                         device: torch.device) -> ReferenceTable:
    """The table for `pairs`, batched as `plan` batches epoch 0; `objective.reference_logps(model, batch, autocast)`
    gives a batch's (2N,) reference log-probs. The model is in eval mode meanwhile (a reference has no dropout)."""
    table = torch.full((len(pairs), 2), float("nan"))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch, rows in zip(iterate(pairs, plan, 0, pad_id, side), plan.batches(0), strict=True):
            table[rows] = objective.reference_logps(model, batch.to(device), autocast).float().cpu().view(2, -1).T
    model.train(was_training)
    return ReferenceTable(table)

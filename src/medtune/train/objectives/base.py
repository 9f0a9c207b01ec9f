"""What every training objective provides (`Objective`), and the shared half of those whose loss is a batch mean.

The trainer knows nothing of a particular loss: it asks the objective how long a row is (batch planning), whether
rows may be packed, how many units a batch's loss is normalised by, for the loss itself, and for the held-out
figures. An objective is one small file in this package and one line in its registry (`__init__.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from medtune.data.batching import Batch, pair_collate
from medtune.data.render import Pair


class Objective(Protocol):
    name: ClassVar[str]  # train.objective
    packable: ClassVar[bool]  # rows may be packed into shared sequences (train.packing)
    uses_reference: ClassVar[bool]  # the loss compares with the base model (the LoRA adapter switched off)
    perplexity: ClassVar[bool]  # held-out figures are a perplexity over single answers (base: eval.perplexity)

    def row_length(self, row) -> int:
        """The length batching plans with."""

    def collate(self, rows: list, pad_id: int, side: str = "right") -> Batch:
        """Rows as one micro-batch (held-out evaluation; training batches come from data.batching.iterate)."""

    def loss_count(self, batch: Batch) -> int:
        """What the batch's loss is normalised by: its loss tokens (summed loss) or 1 (batch-mean loss). A step
        divides the summed loss of its micro-batches (all processes) by the sum of their counts."""

    def loss(self, model, batch: Batch, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        """(the batch's loss, summed or mean as `loss_count` says; its statistics as floats, summed per step)."""

    def evaluate(self, model, rows: list, *, pad_id: int, batch_size: int, autocast, device=None) -> dict[str, float]:
        """Held-out figures over non-empty `rows`: eval_loss and the objective's own."""


@dataclass(frozen=True)
class BatchMeanObjective:
    """Shared by objectives whose loss is the batch's mean (dpo, orpo): never packed, each micro-batch counts 1, so
    a step averages its micro-batches. Rows are preference pairs (batch_size pairs = 2N rows, `pair_collate`); an
    objective on single rows overrides `row_length` and `collate`. Subclasses set `name` and write `loss`."""

    beta: float = 0.1
    packable: ClassVar[bool] = False
    uses_reference: ClassVar[bool] = False
    perplexity: ClassVar[bool] = False

    def row_length(self, row: Pair) -> int:
        return row.length

    def collate(self, rows: list[Pair], pad_id: int, side: str = "right") -> Batch:
        return pair_collate(rows, pad_id, side)

    def loss_count(self, batch: Batch) -> int:
        return 1

    def loss(self, model, batch: Batch, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def evaluate(self, model, rows: list, *, pad_id: int, batch_size: int, autocast, device=None) -> dict[str, float]:
        """The loss and the statistics, each averaged over the held-out batches."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            device = device or next(model.parameters()).device
            batches = [self.collate(rows[k: k + batch_size], pad_id).to(device) for k in range(0, len(rows), batch_size)]
            results = [self.loss(model, b, autocast) for b in batches]
        model.train(was_training)
        out = {"eval_loss": sum(loss.item() for loss, _ in results) / len(results)}
        return out | {f"eval_{k}": sum(st[k] for _, st in results) / len(results) for k in results[0][1]}


def reward_stats(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    """The statistics preference objectives report, as TRL names them."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean()}


def as_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in stats.items()}

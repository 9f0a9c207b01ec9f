"""KTO (Ethayarajh et al. 2024), as TRL 1.16's KTOTrainer (losses.kto_loss), on feedback batches (data.format
feedback, `FeedbackBatch`): N single answers, each liked or disliked, and the KL batch of the same prompts with
mismatched answers. As in TRL, the policy's log-probs of the answers carry the gradient, its log-probs of the KL
rows do not (they only estimate the reference point z0), and the reference (the adapter switched off) scores
both. A batch with only liked (or only disliked) answers is fine: its loss is the mean over what it has.

Reported as TRL names them: kl (z0), rewards/chosen and logps/chosen over the liked answers, rewards/rejected and
logps/rejected over the disliked ones, rewards/margins; a statistic is left out of a batch that has none of its
answers, and the trainer averages it over the batches that have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from medtune.data.batching import FeedbackBatch, feedback_collate
from medtune.data.render import Feedback
from medtune.recipe import TrainConfig
from medtune.train.objectives.base import BatchMeanObjective, as_floats
from medtune.train.objectives.logps import token_logps
from medtune.train.objectives.losses import kto_loss


@dataclass(frozen=True)
class KTO(BatchMeanObjective):
    desirable_weight: float = 1.0  # train.kto_desirable_weight
    undesirable_weight: float = 1.0  # train.kto_undesirable_weight
    max_length: int | None = None  # data.max_length: where a KL row is cut, as in training batches
    name: ClassVar[str] = "kto"
    uses_reference: ClassVar[bool] = True
    stat_names: ClassVar[tuple[str, ...]] = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                             "logps/chosen", "logps/rejected")

    @classmethod
    def from_config(cls, cfg: TrainConfig, max_length: int | None = None) -> KTO:
        return cls(cfg.beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight, max_length)

    def row_length(self, row: Feedback) -> int:
        return row.length

    def collate(self, rows: list[Feedback], pad_id: int, side: str = "right") -> FeedbackBatch:
        return feedback_collate(rows, pad_id, side, self.max_length)

    def loss(self, model, batch: FeedbackBatch, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's mean KTO loss and its statistics. `model`: the peft model in training."""
        logps = token_logps(model, batch, autocast)[0]  # (N,)
        with torch.no_grad():
            kl = token_logps(model, batch.kl, autocast)[0]  # (N,)
            with model.disable_adapter():
                ref = token_logps(model, batch, autocast)[0]
                ref_kl = token_logps(model, batch.kl, autocast)[0]
        liked = batch.labels
        loss, stats = kto_loss(logps[liked], logps[~liked], kl, ref[liked], ref[~liked], ref_kl, self.beta,
                               self.desirable_weight, self.undesirable_weight)
        return loss, as_floats(stats)

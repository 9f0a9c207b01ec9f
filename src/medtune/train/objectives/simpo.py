"""SimPO (Meng et al. 2024), as TRL 1.16's CPOTrainer with loss_type="simpo" and cpo_alpha=0 (losses.simpo_loss),
on batches of pairs (rows 0..N-1 chosen, N..2N-1 rejected): reference-free and length-normalised, the reward is
β times the answer's average log-prob per token, and the chosen answer must beat the rejected one by
train.simpo_gamma; train.label_smoothing softens the labels.

Reported as TRL names them: rewards/chosen, rewards/rejected (β · average log-prob), rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected (average log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from medtune.data.batching import Batch
from medtune.recipe import TrainConfig
from medtune.train.objectives.base import BatchMeanObjective, as_floats
from medtune.train.objectives.logps import token_logps
from medtune.train.objectives.losses import simpo_loss


@dataclass(frozen=True)
class SimPO(BatchMeanObjective):
    gamma: float = 0.5  # train.simpo_gamma
    label_smoothing: float = 0.0  # train.label_smoothing
    name: ClassVar[str] = "simpo"

    @classmethod
    def from_config(cls, cfg: TrainConfig, max_length: int | None = None) -> SimPO:
        return cls(cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)

    def loss(self, model, batch: Batch, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's mean SimPO loss and its statistics. `model`: the peft model in training."""
        logps, counts = token_logps(model, batch, autocast)  # (2N,) each
        chosen, rejected = (logps / counts.clamp(min=1)).chunk(2)  # average log-prob per answer token, (N,) each
        loss, stats = simpo_loss(chosen, rejected, self.beta, self.gamma, self.label_smoothing)
        return loss, as_floats(stats)

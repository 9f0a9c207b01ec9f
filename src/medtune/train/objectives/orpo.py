"""ORPO (Hong et al. 2024), as TRL's ORPOTrainer, on batches of pairs (rows 0..N-1 chosen, N..2N-1 rejected):
    loss = NLL(y_c|x) - λ · log σ(log odds(y_c|x) - log odds(y_r|x)),   odds(y|x) = P / (1 - P)
with P the per-token mean probability (mean log-prob over the answer) and NLL the cross-entropy of the chosen
answer's tokens (TRL also puts the prompt's tokens in it; medtune learns answers only, as in SFT). λ is the
recipe's train.beta. No reference model.

Reported as TRL names them: rewards/chosen, rewards/rejected (λ · mean log-prob), rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected, nll_loss, log_odds_ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from medtune.data.batching import Batch
from medtune.train.objectives.base import BatchMeanObjective, as_floats, reward_stats
from medtune.train.objectives.logps import token_logps


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, nll: torch.Tensor,
              lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss of a batch: `nll` (scalar, mean over the chosen answers' tokens) + λ · odds-ratio term; the log-probs
    are per-token means over each answer, (N,)."""
    # log odds(y) = log P - log(1 - P); log1p(-exp(x)) is log(1 - P) for x = log P < 0
    log_odds = (chosen_mean - rejected_mean) - (torch.log1p(-chosen_mean.exp()) - torch.log1p(-rejected_mean.exp()))  # (N,)
    ratio = F.logsigmoid(log_odds)  # (N,)
    loss = nll - lam * ratio.mean()
    stats = reward_stats(lam * chosen_mean.detach(), lam * rejected_mean.detach(), chosen_mean, rejected_mean)
    return loss, {**stats, "nll_loss": nll.detach(), "log_odds_ratio": ratio.mean().detach()}


@dataclass(frozen=True)
class ORPO(BatchMeanObjective):
    name: ClassVar[str] = "orpo"

    def loss(self, model, batch: Batch, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's mean ORPO loss and its statistics. `model`: the peft model in training."""
        logps, counts = token_logps(model, batch, autocast)  # (2N,), (2N,)
        chosen, rejected = logps.chunk(2)  # (N,) each
        n_chosen, n_rejected = counts.chunk(2)
        nll = -chosen.sum() / n_chosen.sum()
        loss, stats = orpo_loss(chosen / n_chosen, rejected / n_rejected, nll, self.beta)
        return loss, as_floats(stats)

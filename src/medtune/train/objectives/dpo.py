"""DPO (Rafailov et al. 2023), TRL's `loss_type="sigmoid"`, on batches of pairs (rows 0..N-1 chosen, N..2N-1
rejected):
    loss = -log σ(β · [(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])
with log-probs summed over the answer tokens. The reference π_ref is the same model with the LoRA adapter
switched off (peft `disable_adapter`), under no_grad: no second copy of the model in memory.

Reported as TRL names them: rewards/chosen, rewards/rejected (β · log-ratio to the reference), rewards/accuracies
(share of pairs whose chosen reward is higher), rewards/margins (mean difference), logps/chosen, logps/rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from medtune.data.batching import Batch
from medtune.train.objectives.base import BatchMeanObjective, as_floats, reward_stats
from medtune.train.objectives.logps import token_logps


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss over the N pairs; inputs are summed answer log-probs, each (N,)."""
    chosen_rewards = beta * (chosen - ref_chosen)  # (N,)
    rejected_rewards = beta * (rejected - ref_rejected)  # (N,)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, reward_stats(chosen_rewards.detach(), rejected_rewards.detach(), chosen, rejected)


@dataclass(frozen=True)
class DPO(BatchMeanObjective):
    name: ClassVar[str] = "dpo"
    uses_reference: ClassVar[bool] = True

    def loss(self, model, batch: Batch, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's mean DPO loss and its statistics. `model`: the peft model in training."""
        chosen, rejected = token_logps(model, batch, autocast)[0].chunk(2)  # (N,) each
        with torch.no_grad(), model.disable_adapter():
            ref_chosen, ref_rejected = token_logps(model, batch, autocast)[0].chunk(2)
        loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return loss, as_floats(stats)

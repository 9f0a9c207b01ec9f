"""DPO (Rafailov et al. 2023) and its variants, as TRL 1.16's DPOTrainer (train.dpo_loss_type: sigmoid, ipo,
robust, hinge; losses.dpo_loss), on batches of pairs (rows 0..N-1 chosen, N..2N-1 rejected), with log-probs
summed over the answer tokens. The reference π_ref is the same model with the LoRA adapter switched off (peft
`disable_adapter`), under no_grad: no second copy of the model in memory. With train.precompute_reference the
batch brings its reference log-probs along (reference.py) and the step skips that forward pass.

Reported as TRL names them: rewards/chosen, rewards/rejected (β · log-ratio to the reference), rewards/accuracies
(share of pairs whose chosen reward is higher), rewards/margins (mean difference), logps/chosen, logps/rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from medtune.data.batching import Batch
from medtune.recipe import TrainConfig
from medtune.train.objectives.base import BatchMeanObjective, as_floats
from medtune.train.objectives.logps import token_logps
from medtune.train.objectives.losses import dpo_loss
from medtune.train.objectives.reference import ReferencedBatch


@dataclass(frozen=True)
class DPO(BatchMeanObjective):
    loss_type: str = "sigmoid"  # train.dpo_loss_type
    label_smoothing: float = 0.0  # train.label_smoothing (robust only)
    name: ClassVar[str] = "dpo"
    uses_reference: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: TrainConfig, max_length: int | None = None) -> DPO:
        return cls(cfg.beta, cfg.dpo_loss_type, cfg.label_smoothing)

    def reference_logps(self, model, batch: Batch, autocast) -> torch.Tensor:
        """Summed answer log-probs of the batch's rows under the reference (adapter off), (2N,), no gradient."""
        with torch.no_grad(), model.disable_adapter():
            return token_logps(model, batch, autocast)[0]

    def loss(self, model, batch: Batch, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's mean DPO loss and its statistics. `model`: the peft model in training."""
        logps, counts = token_logps(model, batch, autocast)  # (2N,) each
        ref = batch.reference if isinstance(batch, ReferencedBatch) else self.reference_logps(model, batch, autocast)
        (chosen, rejected), (ref_chosen, ref_rejected), (n_chosen, n_rejected) = \
            logps.chunk(2), ref.chunk(2), counts.chunk(2)
        loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type,
                               self.label_smoothing, chosen_tokens=n_chosen, rejected_tokens=n_rejected)
        return loss, as_floats(stats)

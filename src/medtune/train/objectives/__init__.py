"""Training objectives as components: `get_objective(recipe.train, data.max_length)` gives one behind the
`Objective` protocol (base.py), and `LossModule` joins it to the model for the training engine.

    sft.py        token cross-entropy over the answers (chunked: no full-vocabulary logits)
    dpo.py        DPO on preference pairs (train.dpo_loss_type); reference = the adapter switched off
    orpo.py       ORPO on preference pairs; no reference
    simpo.py      SimPO on preference pairs; no reference, length-normalised
    kto.py        KTO on feedback rows (one answer, thumbs up or down); reference = the adapter switched off
    losses.py     the preference losses as pure functions (each equal to TRL 1.16's)
    logps.py      summed answer-token log-probs, shared by the preference objectives
    reference.py  train.precompute_reference: DPO's reference log-probs computed once, before training

A new objective is one file with a class like `DPO` and one line in OBJECTIVES.
"""

from __future__ import annotations

import torch

from medtune.data.batching import Batch
from medtune.errors import MedtuneError
from medtune.recipe import TrainConfig
from medtune.train.objectives.base import Objective
from medtune.train.objectives.dpo import DPO
from medtune.train.objectives.kto import KTO
from medtune.train.objectives.orpo import ORPO
from medtune.train.objectives.sft import SFT
from medtune.train.objectives.simpo import SimPO

OBJECTIVES: dict[str, type[Objective]] = {  # train.objective → the objective; its from_config reads its keys
    "sft": SFT,
    "dpo": DPO,
    "orpo": ORPO,
    "simpo": SimPO,
    "kto": KTO,
}


def get_objective(cfg: TrainConfig, max_length: int | None = None) -> Objective:
    """The objective the recipe's train section names, configured by it (`max_length`: data.max_length)."""
    if cfg.objective not in OBJECTIVES:
        raise MedtuneError(f"unknown train.objective {cfg.objective!r} (known: {', '.join(OBJECTIVES)})",
                           field="train.objective")
    return OBJECTIVES[cfg.objective].from_config(cfg, max_length)


def evaluate(model, rows: list, *, pad_id: int, batch_size: int, autocast, device=None, objective: str = "sft",
             beta: float = 0.1) -> dict[str, float]:
    """Held-out figures of `objective` (its other keys at their defaults) over `rows` ({} when there are none):
    sft's loss, perplexity and tokens, token-weighted; a preference objective's loss and statistics, averaged over
    the batches."""
    if not rows:
        return {}
    return get_objective(TrainConfig(objective=objective, beta=beta)).evaluate(
        model, rows, pad_id=pad_id, batch_size=batch_size, autocast=autocast, device=device)


class LossModule(torch.nn.Module):
    """The model and its loss as one module: what DDP / FSDP / DeepSpeed wrap, so every training forward goes
    through the engine."""

    def __init__(self, model, autocast, objective: Objective):
        super().__init__()
        self.model = model
        self.autocast = autocast
        self.objective = objective

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(the batch's loss, its statistics): sft the summed token loss and {}; the others the batch's mean loss
        and its reward statistics."""
        return self.objective.loss(self.model, batch, self.autocast)


__all__ = ["OBJECTIVES", "LossModule", "Objective", "evaluate", "get_objective"]

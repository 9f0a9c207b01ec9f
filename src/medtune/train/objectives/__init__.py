"""Training objectives as components: `get_objective(train.objective, train.beta)` gives one behind the `Objective`
protocol (base.py), and `LossModule` joins it to the model for the training engine.

    sft.py    token cross-entropy over the answers (chunked: no full-vocabulary logits)
    dpo.py    DPO on preference pairs; reference = the adapter switched off
    orpo.py   ORPO on preference pairs; no reference
    logps.py  summed answer-token log-probs, shared by the preference objectives

A new objective is one file with a class like `DPO` and one line in OBJECTIVES.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from medtune.data.batching import Batch
from medtune.errors import MedtuneError
from medtune.train.objectives.base import Objective
from medtune.train.objectives.dpo import DPO
from medtune.train.objectives.orpo import ORPO
from medtune.train.objectives.sft import SFT

OBJECTIVES: dict[str, Callable[[float], Objective]] = {  # train.objective → the objective, given train.beta
    "sft": lambda beta: SFT(),
    "dpo": DPO,
    "orpo": ORPO,
}


def get_objective(name: str, beta: float = 0.1) -> Objective:
    if name not in OBJECTIVES:
        raise MedtuneError(f"unknown train.objective {name!r} (known: {', '.join(OBJECTIVES)})",
                           field="train.objective")
    return OBJECTIVES[name](beta)


def evaluate(model, rows: list, *, pad_id: int, batch_size: int, autocast, device=None, objective: str = "sft",
             beta: float = 0.1) -> dict[str, float]:
    """Held-out figures of `objective` over `rows` ({} when there are none): sft's loss, perplexity and tokens,
    token-weighted; a preference objective's loss and statistics, averaged over the batches."""
    if not rows:
        return {}
    return get_objective(objective, beta).evaluate(model, rows, pad_id=pad_id, batch_size=batch_size,
                                                   autocast=autocast, device=device)


class LossModule(torch.nn.Module):
    """The model and its loss as one module: what DDP / FSDP / DeepSpeed wrap, so every training forward goes
    through the engine."""

    def __init__(self, model, autocast, objective: Objective):
        super().__init__()
        self.model = model
        self.autocast = autocast
        self.objective = objective

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(the batch's loss, its statistics): sft the summed token loss and {}; dpo / orpo the mean pair loss and
        its reward statistics."""
        return self.objective.loss(self.model, batch, self.autocast)


__all__ = ["OBJECTIVES", "LossModule", "Objective", "evaluate", "get_objective"]

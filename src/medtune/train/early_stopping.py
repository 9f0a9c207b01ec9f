"""train.early_stopping_patience: stop when the held-out loss has not improved for that many evaluations."""

from __future__ import annotations

import math


class EarlyStopping:
    """Counts evaluations without a new best held-out loss; `should_stop` once `patience` pass (0 = never)."""

    def __init__(self, patience: int):
        self.patience, self.best, self.stale = patience, math.inf, 0

    def should_stop(self, loss: float) -> bool:
        if loss < self.best:
            self.best, self.stale = loss, 0
        else:
            self.stale += 1
        return 0 < self.patience <= self.stale

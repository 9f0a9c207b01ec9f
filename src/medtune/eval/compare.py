"""Base vs tuned on the same items: each metric's delta with a 95% paired-bootstrap confidence interval.

Items are resampled with replacement, the SAME indices for base and tuned, and the metric recomputed on each
resample (a ratio metric like perplexity = exp(sum NLL / sum tokens) is recomputed from its per-item sums, not
averaged). The interval is the 2.5th-97.5th percentile of the resampled deltas; when it contains 0 the delta is
not significant at the 5% level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Statistic = Callable[[np.ndarray], float]  # rows of per-item values (n, k) → the metric


def mean_of(column: int = 0) -> Statistic:
    return lambda rows: float(rows[:, column].mean())


def perplexity_of(rows: np.ndarray) -> float:
    """rows (n, 2): summed NLL and token count per text."""
    return math.exp(min(rows[:, 0].sum() / max(rows[:, 1].sum(), 1), 50.0))


def paired_bootstrap(base: Sequence, tuned: Sequence, statistic: Statistic, *, iters: int = 1000, seed: int = 0,
                     higher_is_better: bool = True) -> dict:
    """{base, tuned, delta, ci_low, ci_high, significant, better}: delta = tuned - base."""
    b = np.asarray(base, dtype=np.float64).reshape(len(base), -1)  # (n, k)
    t = np.asarray(tuned, dtype=np.float64).reshape(len(tuned), -1)  # (n, k)
    if b.shape != t.shape or len(b) == 0:
        raise ValueError(f"paired bootstrap needs the same items for both models, got {b.shape} and {t.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(b), size=(iters, len(b)))  # (iters, n)
    deltas = np.array([statistic(t[i]) - statistic(b[i]) for i in idx])  # (iters,)
    low, high = np.percentile(deltas, [2.5, 97.5])
    delta = statistic(t) - statistic(b)
    significant = bool(low > 0 or high < 0)
    better = None if not significant else ((delta > 0) == higher_is_better)
    return {"base": statistic(b), "tuned": statistic(t), "delta": delta, "ci_low": float(low), "ci_high": float(high),
            "significant": significant, "better": better, "higher_is_better": higher_is_better, "n": len(b)}


def verdict(metric: str, row: dict) -> str:
    """One plain sentence about a compared metric."""
    ci = f"95% CI [{row['ci_low']:+.4g}, {row['ci_high']:+.4g}]"
    if not row["significant"]:
        return f"{metric}: delta {row['delta']:+.4g} ({ci}) is NOT significant: no evidence the fine-tune changed it"
    word = "better" if row["better"] else "worse"
    return f"{metric}: delta {row['delta']:+.4g} ({ci}): the tuned model is significantly {word}"

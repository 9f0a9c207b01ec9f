"""Calibration of multiple-choice answers: how far the model's confidence is from how often it is right.

The model's probability of each option is the softmax over the options' summed log-likelihoods (the same numbers
lm-eval ranks for `acc`); the answer is the most likely option and its probability is the confidence.
  ECE    expected calibration error: items put into 15 equal-width confidence bins (0-1/15, ..., 14/15-1);
         sum over bins of (items in bin / all items) x |accuracy in bin - mean confidence in bin|. 0 = calibrated.
  Brier  multi-class Brier score: per item, sum over options of (p_option - [option is gold])^2, averaged.
         0 = certain and right; 2 = certain and wrong.
Both are lower-is-better and recomputed on each paired-bootstrap resample from the per-item (confidence, acc,
Brier) values.
"""

from __future__ import annotations

import numpy as np

BINS = 15


def option_probs(logliks: list[float]) -> np.ndarray:
    x = np.asarray(logliks, dtype=np.float64)
    e = np.exp(x - x.max())  # softmax, shifted so the largest term is exp(0)
    return e / e.sum()


def item_calibration(logliks: list[float], gold: int) -> tuple[float, float]:
    """(confidence, Brier) of one item from its options' log-likelihoods; it is correct when acc is 1 (the same
    argmax)."""
    p = option_probs(logliks)
    onehot = np.zeros_like(p)
    onehot[gold] = 1.0
    return float(p.max()), float(((p - onehot) ** 2).sum())


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error over equal-width bins; a confidence on an inner edge goes to the lower bin."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # (n,) bin index, (lo, hi]
    total = 0.0
    for b in np.unique(which):
        mask = which == b
        total += mask.sum() / len(confidence) * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total)

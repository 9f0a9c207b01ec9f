"""ECE (15 equal-width bins) and multi-class Brier score of multiple-choice answers, against hand-computed values
and scikit-learn's brier_score_loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medtune.eval.calibration import ece, item_calibration, option_probs


def reference_ece(confidence, correct, bins=15):
    """Written out the textbook way: bin edges k/15, bins (lo, hi], the first one [0, 1/15]."""
    edges = [k / bins for k in range(bins + 1)]
    total = 0.0
    for k in range(bins):
        members = [(c, y) for c, y in zip(confidence, correct, strict=True)
                   if (edges[k] < c <= edges[k + 1]) or (k == 0 and c == 0)]
        if members:
            acc = sum(y for _, y in members) / len(members)
            conf = sum(c for c, _ in members) / len(members)
            total += len(members) / len(confidence) * abs(acc - conf)
    return total


def test_ece_hand_computed():
    # bins: 0.95 and 0.99 -> bin 15 (acc 0.5, conf 0.97); 0.5 -> bin 8 (acc 1, conf 0.5); 0.3 -> bin 5 (acc 0, conf 0.3)
    confidence, correct = [0.95, 0.99, 0.5, 0.3], [1, 0, 1, 0]
    want = 2 / 4 * abs(0.5 - 0.97) + 1 / 4 * abs(1 - 0.5) + 1 / 4 * abs(0 - 0.3)
    assert ece(confidence, correct) == pytest.approx(want)
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.25, 1, 500)
    conf[:3] = [1 / 15, 2 / 15, 1.0]  # values on bin edges
    hits = (rng.uniform(size=500) < conf).astype(float)
    assert ece(conf, hits) == pytest.approx(reference_ece(conf.tolist(), hits.tolist()))
    assert ece([0.8] * 10, [1] * 8 + [0] * 2) == pytest.approx(0.0)  # 80% sure and right 80% of the time


def test_item_probabilities_and_brier_by_hand():
    logliks = [math.log(0.5), math.log(0.3), math.log(0.2)]  # already normalised: softmax gives them back
    assert option_probs(logliks) == pytest.approx([0.5, 0.3, 0.2])
    assert option_probs([x - 40 for x in logliks]) == pytest.approx([0.5, 0.3, 0.2])  # shift-invariant
    confidence, brier = item_calibration(logliks, gold=1)
    assert confidence == pytest.approx(0.5)
    assert brier == pytest.approx(0.5**2 + 0.7**2 + 0.2**2)


def test_brier_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    logliks, gold = rng.normal(size=(200, 4)) * 3, rng.integers(0, 4, 200)
    ours = np.mean([item_calibration(row, int(g))[1] for row, g in zip(logliks, gold, strict=True)])
    probs = np.array([option_probs(row) for row in logliks])
    assert ours == pytest.approx(metrics.brier_score_loss(gold, probs, labels=[0, 1, 2, 3], scale_by_half=False))
    # binary: the multi-class score counts both options, twice sklearn's binary (positive-class) score
    two, yes = rng.normal(size=(100, 2)), rng.integers(0, 2, 100)
    ours = np.mean([item_calibration(row, int(g))[1] for row, g in zip(two, yes, strict=True)])
    p_yes = np.array([option_probs(row)[1] for row in two])
    assert ours == pytest.approx(2 * metrics.brier_score_loss(yes, p_yes))

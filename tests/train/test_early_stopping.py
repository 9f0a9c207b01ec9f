"""Early stopping on held-out loss: the counter, and a tiny run that stops when its eval loss cannot improve."""

from __future__ import annotations

import pytest
from conftest import tiny_recipe

from medtune.errors import MedtuneError
from medtune.train.early_stopping import EarlyStopping
from medtune.train.job import run_training


def test_counter():
    stop = EarlyStopping(2)
    assert [stop.should_stop(x) for x in (3.0, 2.5, 2.6, 2.4, 2.4, 2.5)] == [False, False, False, False, False, True]
    assert stop.best == 2.4
    never = EarlyStopping(0)
    assert not any(never.should_stop(5.0) for _ in range(10))


def recipe(model_dir, out, *extra):
    """conftest's tiny run on 16 rows of 64 tokens, 10 steps, LoRA r 2, lr 2e-4, a loss logged every 10 steps."""
    return tiny_recipe(model_dir, out, "data.limit=16", "data.max_length=64", "train.max_steps=10", "lora.r=2",
                       "train.lr=2e-4", "train.logging_steps=10", *extra)


def test_run_stops_when_eval_loss_stalls(tiny_model_dir, tmp_path):
    # SGD at lr 1e-30 moves nothing the loss can see: every evaluation after the first is "not better"
    result = run_training(recipe(tiny_model_dir, tmp_path / "run", "train.optimizer=sgd", "train.lr=1e-30",
                                 "train.eval_steps=1", "train.early_stopping_patience=2", "train.eval_before=false"))
    assert result.metrics["steps"] == 3


def test_patience_needs_eval_steps(tiny_model_dir, tmp_path):
    with pytest.raises(MedtuneError, match="eval_steps"):
        run_training(recipe(tiny_model_dir, tmp_path / "run", "train.early_stopping_patience=2"))

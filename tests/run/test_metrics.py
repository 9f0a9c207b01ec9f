"""RunDir against the real trackers (TensorBoard, W&B offline, MLflow on SQLite), and its plots."""

from __future__ import annotations

import json
import logging
import math

import pytest

from medtune.recipe import Recipe
from medtune.run.metrics import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_metrics(step: int, *, grad_norm: bool = True) -> dict[str, float]:
    """Plausible numbers for step 1..20: decaying loss, warm-up then linear decay, a shrinking gradient norm."""
    metrics = {"loss": 0.8 + 2.0 * math.exp(-step / 6), "learning_rate": 2e-4 * min(step / 4, (21 - step) / 17),
               "tokens_per_s": 900.0 + step}
    if grad_norm:
        metrics["grad_norm"] = 3.0 / math.sqrt(step)
    if step % 10 == 0:
        metrics["eval_loss"] = 1.0 + 1.5 * math.exp(-step / 8)
    return metrics


def log_steps(run: RunDir, steps: range, **kwargs) -> None:
    for step in steps:
        run.log(fake_metrics(step, **kwargs), step=step)


def test_all_trackers_receive_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    path = tmp_path / "run"
    run = RunDir(path, run_name="demo", config=Recipe().to_dict(), report_to=["tensorboard", "wandb", "mlflow"])
    log_steps(run, range(1, 21))
    run.close()
    run.close()

    rows = run.read_metrics()
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert len((path / "metrics.jsonl").read_text().splitlines()) == 20
    losses = [fake_metrics(s)["loss"] for s in range(1, 21)]
    assert [r["loss"] for r in rows] == losses

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == list(range(1, 21))
    assert [e.value for e in scalars] == pytest.approx(losses, rel=1e-6)

    assert list((path / "wandb").glob("offline-run-*/run-*.wandb"))

    from mlflow.tracking import MlflowClient

    assert (path / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{path.resolve() / 'mlflow.db'}")
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("medtune").experiment_id])
    assert mlflow_run.info.run_name == "demo" and mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["lora.r"] == "16"
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 21))
    assert [m.value for m in history] == pytest.approx(losses)


def test_plots_draw_what_was_logged(tmp_path):
    run = RunDir(tmp_path / "full", run_name="full", config={}, report_to=[])
    log_steps(run, range(1, 21))
    paths = run.plots()
    assert [p.name for p in paths] == ["loss.png", "learning_rate.png", "grad_norm.png"]
    for p in paths:
        data = p.read_bytes()
        assert p.parent == tmp_path / "full" / "plots"
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000

    run = RunDir(tmp_path / "no_grad", run_name="no_grad", config={}, report_to=[])
    log_steps(run, range(1, 21), grad_norm=False)
    assert [p.name for p in run.plots()] == ["loss.png", "learning_rate.png"]
    assert not (tmp_path / "no_grad" / "plots" / "grad_norm.png").exists()
    run.close()


def test_resume_appends_and_a_fresh_start_truncates(tmp_path):
    first = RunDir(tmp_path, run_name="r", config={}, report_to=[])
    log_steps(first, range(1, 11))
    first.close()

    resumed = RunDir(tmp_path, run_name="r", config={}, report_to=[], resume=True)
    log_steps(resumed, range(11, 21))
    resumed.close()
    assert [r["step"] for r in resumed.read_metrics()] == list(range(1, 21))

    fresh = RunDir(tmp_path, run_name="r", config={}, report_to=[])
    fresh.log({"loss": 1.0}, step=1)
    fresh.close()
    assert fresh.read_metrics() == [{"step": 1, "loss": 1.0}]


def test_a_tracker_that_fails_to_start_warns_once_and_is_skipped(tmp_path, monkeypatch, caplog):
    import mlflow

    def refuse(uri):
        raise RuntimeError("database is locked\nsecond line of detail")

    monkeypatch.setattr(mlflow, "set_tracking_uri", refuse)
    with caplog.at_level(logging.WARNING, logger="medtune"):
        run = RunDir(tmp_path, run_name="r", config={"lora": {"r": 16}}, report_to=["mlflow"])
        log_steps(run, range(1, 6))
        run.close()
        run.close()
    assert [r.getMessage() for r in caplog.records] == [
        "mlflow tracker not started: RuntimeError: database is locked"]
    assert len(run.read_metrics()) == 5
    assert not (tmp_path / "mlflow.db").exists()


def test_a_tracker_that_fails_while_logging_is_dropped(tmp_path, monkeypatch, caplog):
    from torch.utils.tensorboard import SummaryWriter

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    with caplog.at_level(logging.WARNING, logger="medtune"):
        run = RunDir(tmp_path, run_name="r", config={}, report_to=["tensorboard"])
        log_steps(run, range(1, 6))
        run.close()
    assert [r.getMessage() for r in caplog.records] == ["tensorboard tracker stopped: OSError: disk full"]
    assert len(run.read_metrics()) == 5


def test_metrics_jsonl_is_plain_json(tmp_path):
    run = RunDir(tmp_path, run_name="r", config={}, report_to=[])
    run.log({"loss": 2.0, "tokens_per_s": 10}, step=3)
    run.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "loss": 2.0, "tokens_per_s": 10.0}


def test_perplexity_bars_are_labelled(tmp_path):
    from medtune.run.metrics import perplexity_figure

    fig = perplexity_figure(15.544, 8.417)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base model", "tuned model"]
    assert [t.get_text() for t in ax.texts] == ["15.54", "8.417"]  # value labels: the card's rounding (4 digits)
    assert [round(p.get_height(), 3) for p in ax.patches] == [15.544, 8.417]
    assert "perplexity" in ax.get_title().lower() and ax.get_ylabel() == "perplexity"
    run = RunDir(tmp_path / "run", run_name="r", config={}, report_to=[])
    assert tmp_path / "run" / "plots" / "perplexity.png" in run.plots({"base_eval_ppl": 15.5, "eval_ppl": 8.4})
    assert run.plots({"eval_ppl": 8.4}) == []  # no base figure, no bars
    run.close()

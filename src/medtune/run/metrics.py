"""A run's metrics: metrics.jsonl, the trackers that mirror it, and the plots drawn from it.

```
runs/<name>/
  metrics.jsonl      one {"step": ..., <metric>: ...} object per log call (always written)
  tensorboard/       event files            (report_to: tensorboard)
  wandb/             offline W&B run        (report_to: wandb; `wandb sync` uploads it later)
  mlflow.db          local MLflow store     (report_to: mlflow; `mlflow ui --backend-store-uri sqlite:///...`)
  plots/*.png        loss, learning rate, gradient norm; perplexity.png: held-out base vs tuned bars
```

The trackers live here, with metrics.jsonl, not in train/: they write into the run directory and mirror exactly
what metrics.jsonl records, so one `RunDir.log` call feeds all of them; the training loop only calls it.

The training loop logs under these names: `loss`, `eval_loss`, `learning_rate` (also at step 0 and at every warm-up
step: `lr_point`), `grad_norm` (plotted), plus
anything else (`tokens_per_s`, `eval_ppl`, ...), which goes to metrics.jsonl and the trackers only.
Trackers are optional: one that cannot start, or fails later, is reported once and dropped, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.run.layout import METRICS, MLFLOW_DB, PLOTS, TENSORBOARD

log = logging.getLogger("medtune")

_PARAM_VALUE_CHARS = 250

# file stem, title, y label, then (metric, legend label, matplotlib format) per series
_PLOTS = [
    ("loss", "Loss", "loss", [("loss", "train loss", "-"), ("eval_loss", "eval loss", "o")]),
    ("learning_rate", "Learning rate", "learning rate", [("learning_rate", "learning rate", "-")]),
    ("grad_norm", "Gradient norm", "gradient norm", [("grad_norm", "gradient norm", "-")]),
]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every row of RUN/metrics.jsonl, in the order logged ([] before the first log call)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class _Tracker:
    name: str
    log: Callable[[dict[str, float], int], None]
    close: Callable[[], None]


class RunDir:
    """Writes metrics.jsonl, forwards metrics to the chosen trackers and draws plots."""

    def __init__(self, path: Path, *, run_name: str, config: dict, report_to: list[str],
                 wandb_project: str = "medtune", resume: bool = False):
        self.path = Path(path)
        self.run_name = run_name
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics_file = (self.path / METRICS).open("a" if resume else "w", encoding="utf-8")
        starters: dict[str, Callable[[], _Tracker]] = {
            "tensorboard": lambda: _start_tensorboard(self.path),
            "wandb": lambda: _start_wandb(self.path, run_name, config, wandb_project),
            "mlflow": lambda: _start_mlflow(self.path, run_name, config),
        }
        self._trackers: list[_Tracker] = []
        for name in report_to:
            try:
                if name not in starters:
                    raise ValueError(f"unknown tracker (known: {', '.join(starters)})")
                self._trackers.append(starters[name]())
            except Exception as e:  # a tracker is never worth a failed run
                log.warning("%s tracker not started: %s", name, _one_line(e))

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append `{"step": step, **metrics}` to metrics.jsonl and forward the metrics to every tracker."""
        metrics = {k: float(v) for k, v in metrics.items()}
        self._metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._metrics_file.flush()
        for tracker in list(self._trackers):
            try:
                tracker.log(metrics, step)
            except Exception as e:
                log.warning("%s tracker stopped: %s", tracker.name, _one_line(e))
                self._trackers.remove(tracker)

    def read_metrics(self) -> list[dict]:
        """Every row of metrics.jsonl, in the order logged."""
        return read_metrics(self.path)

    def plots(self, final: dict[str, float] | None = None) -> list[Path]:
        """Draw plots/loss.png, learning_rate.png and grad_norm.png from metrics.jsonl, and plots/perplexity.png
        from the `final` metrics (base_eval_ppl, eval_ppl); skip a plot with no data."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        rows = self.read_metrics()
        written = []
        for stem, title, ylabel, series in _PLOTS:
            drawn = [(label, fmt, data) for key, label, fmt in series if (data := _series(rows, key))]
            if not drawn:
                continue
            fig = Figure(figsize=(6.4, 4.0), layout="constrained")
            FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
            ax = fig.subplots()
            for label, fmt, (steps, values) in drawn:
                ax.plot(steps, values, fmt, label=label)
            ax.set(title=title, xlabel="step", ylabel=ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if len(series) > 1:
                ax.legend()
            out = self.path / PLOTS / f"{stem}.png"
            out.parent.mkdir(exist_ok=True)
            fig.savefig(out, dpi=100)
            written.append(out)
        final = final or {}
        if "base_eval_ppl" in final and "eval_ppl" in final:
            out = self.path / "plots" / "perplexity.png"
            out.parent.mkdir(exist_ok=True)
            perplexity_figure(final["base_eval_ppl"], final["eval_ppl"]).savefig(out, dpi=100)
            written.append(out)
        return written

    def close(self) -> None:
        """Finish every tracker and close metrics.jsonl; calling it again does nothing."""
        while self._trackers:
            tracker = self._trackers.pop()
            try:
                tracker.close()
            except Exception as e:
                log.warning("%s tracker did not close cleanly: %s", tracker.name, _one_line(e))
        self._metrics_file.close()


def perplexity_figure(base: float, tuned: float):
    """Held-out perplexity of the base and the tuned model as two labelled bars (lower is better)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bars = ax.bar(["base model", "tuned model"], [base, tuned], color=["#9e9e9e", "#1f77b4"], width=0.6)
    ax.bar_label(bars, labels=[f"{base:.4g}", f"{tuned:.4g}"], padding=3)
    ax.set(title="Held-out perplexity (lower is better)", ylabel="perplexity", ylim=(0, max(base, tuned) * 1.15))
    ax.grid(axis="y", alpha=0.3)
    return fig


# --- trackers -------------------------------------------------------------------------------------------------

def _start_tensorboard(path: Path) -> _Tracker:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(path / TENSORBOARD))

    def log_scalars(metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        writer.flush()  # so a running `tensorboard --logdir` sees each log call

    return _Tracker("tensorboard", log_scalars, writer.close)


def _start_wandb(path: Path, run_name: str, config: dict, project: str) -> _Tracker:
    import wandb

    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "online" and not wandb.login(prompt=False, verify=False):
        raise RuntimeError("WANDB_MODE=online but no W&B API key; set WANDB_API_KEY or run `wandb login`")
    run = wandb.init(project=project, name=run_name, dir=str(path), config=config, mode=mode)
    return _Tracker("wandb", lambda metrics, step: run.log(metrics, step=step), run.finish)


def _start_mlflow(path: Path, run_name: str, config: dict) -> _Tracker:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # a local store should not phone home
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{path.resolve() / MLFLOW_DB}")
    mlflow.set_experiment("medtune")
    mlflow.start_run(run_name=run_name)
    try:
        mlflow.log_params({k: str(v)[:_PARAM_VALUE_CHARS] for k, v in flatten(config).items()})
    except Exception:
        mlflow.end_run(status="FAILED")
        raise
    return _Tracker("mlflow", lambda metrics, step: mlflow.log_metrics(metrics, step=step), mlflow.end_run)


# --- small helpers --------------------------------------------------------------------------------------------

def lr_point(scheduler) -> dict[str, float]:
    """The learning rate the scheduler's next optimizer step uses, as a metrics row. The loop logs it at step 0
    (before the first step) and at every warm-up step besides its regular logging, so the plot shows the warm-up
    ramp instead of a line from the first logged step."""
    return {"learning_rate": float(scheduler.get_last_lr()[0])}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 16}} → {"lora.r": 16}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]] | None:
    """(steps, values) of one metric, sorted by step; a step logged twice (after a resume) keeps its last value."""
    by_step = {row["step"]: row[key] for row in rows if key in row}
    if not by_step:
        return None
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _one_line(error: Exception) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__

"""The release gate's forest plot (RUN/plots/gate.png): one row per axis, its delta (tuned - base) as a point with
its 95 % interval as a bar, 0 as a solid line, the tolerance as a dashed line on the worse side, coloured by the
verdict. Each row has its own scale (axes differ in units: perplexity, accuracy, ...) and is drawn so that
better is to the right (lower-is-better axes are mirrored)."""

from __future__ import annotations

from pathlib import Path

COLOURS = {"improved": "#2e7d32", "no significant change": "#757575", "regressed": "#c62828"}
ROW_INCHES = 0.75  # height of one axis row


def forest_plot(report: dict, out: str | Path) -> Path:
    """Draw the gate report's axes to `out` (PNG, Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axes = report["axes"]
    fig = Figure(figsize=(7.5, 1.0 + ROW_INCHES * len(axes)), layout="constrained")
    FigureCanvasAgg(fig)
    rows = fig.subplots(len(axes), 1, squeeze=False)[:, 0]
    for ax, a in zip(rows, axes, strict=True):
        _row(ax, a)
    verdict = "PASS" if report["passed"] else "FAIL: " + ", ".join(report["regressed"])
    fig.suptitle(f"Release gate: {verdict}\ndelta = tuned - base, 95% interval; better to the right", fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _row(ax, a: dict) -> None:
    """One axis: point, interval, 0, tolerance line, the verdict above on the right."""
    colour = COLOURS[a["verdict"]]
    worse = -1.0 if a["higher_is_better"] else 1.0  # the direction of a worse delta
    tolerance = worse * a["tolerance"]
    ax.errorbar([a["delta"]], [0], xerr=[[a["delta"] - a["ci_low"]], [a["ci_high"] - a["delta"]]], fmt="o",
                color=colour, capsize=4, markersize=6)
    ax.axvline(0, color="black", linewidth=0.8)
    if a["tolerance"] > 0 or a["require"] == "non_inferior":
        ax.axvline(tolerance, color="#ef6c00", linestyle="--", linewidth=1)
    span = [a["ci_low"], a["ci_high"], 0.0, tolerance]
    pad = (max(span) - min(span)) * 0.15 or 1e-3
    ax.set_xlim(min(span) - pad, max(span) + pad)
    if not a["higher_is_better"]:
        ax.invert_xaxis()  # better (lower) to the right
    ax.set_yticks([])
    ax.set_ylabel(a["axis"] + ("" if a["gating"] else "\n(not gating)"), rotation=0, ha="right", va="center",
                  fontsize=9)
    ax.set_title(a["verdict"], loc="right", color=colour, fontsize=9, pad=2)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)

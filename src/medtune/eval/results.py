"""One task's evaluation result: what eval/suite.py produces and eval/report.py writes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]  # the evaluated model's (tuned with --compare-base)
    base: dict[str, float] | None = None
    delta: dict[str, dict] | None = None  # metric → paired bootstrap row
    subtasks: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        if self.base is None:
            return {**self.metrics, **({"subtasks": self.subtasks} if self.subtasks else {})}
        return {"base": self.base, "tuned": self.metrics, "delta": self.delta,
                **({"subtasks": self.subtasks} if self.subtasks else {})}

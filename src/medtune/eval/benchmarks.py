"""Benchmark items (data/benchmark_files.py reads them) → lm-evaluation-harness task YAMLs.

`write_tasks` writes the items as .jsonl plus one task YAML per task (MMLU: one per subject, each with its own
description, as lm-eval's `mmlu_<subject>`) that reads them offline through `dataset_path: json`. The same YAML
folder works with the `lm_eval` command line (`--include_path DIR`), which is how the trust check compares medtune
with lm-eval's own HF backend.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import yaml

from medtune.data.benchmark_files import Item, Subset


def write_tasks(subsets: list[Subset], folder: Path, shots: list[Subset] | None = None) -> list[str]:
    """Write each subset as `<name>.jsonl` + `<name>.yaml` into folder (shots, matched by name, as
    `<name>_shots.jsonl`, taken first-n as lm-eval's MMLU does); returns the task names."""
    folder.mkdir(parents=True, exist_ok=True)
    shot_by_name = {s.name: s for s in shots or []}
    names = []
    for subset in subsets:
        data = folder / f"{subset.name}.jsonl"
        _write_jsonl(data, subset.items)
        files = {"test": str(data)}
        config = {"task": subset.name, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
                  "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "query",
                  "doc_to_choice": "choices", "doc_to_target": "gold", "description": subset.description,
                  "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                  for m in ("acc", "acc_norm")],
                  "metadata": {"version": 1.0}}
        if subset.name in shot_by_name:
            shot_file = folder / f"{subset.name}_shots.jsonl"
            _write_jsonl(shot_file, shot_by_name[subset.name].items)
            files["train"] = str(shot_file)
            config.update(fewshot_split="train", fewshot_config={"sampler": "first_n"})
        (folder / f"{subset.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        names.append(subset.name)
    return names


def _write_jsonl(path: Path, items: list[Item]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")

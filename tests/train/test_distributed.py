"""Scale-out: `medtune train --nproc 2` (torchrun, 2 CPU processes, gloo, DDP through accelerate) trains exactly
what one process with gradient accumulation 2 trains, and only rank 0 writes the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY, losses, tiny_recipe
from safetensors.torch import load_file

from medtune.data.batching import BatchPlan
from medtune.train.distributed import shard
from medtune.train.job import run_training


def test_shards_see_each_sample_once_per_epoch():
    plan = BatchPlan([5] * 23, batch_size=2, seed=1)  # 12 micro-batches per epoch, the last one short
    per_epoch = len(plan)
    stream = [b for epoch in range(3) for b in plan.batches(epoch)]
    for world in (2, 3):
        ranks = [list(shard(iter(stream), r, world)) for r in range(world)]
        dealt = [b for step in zip(*ranks, strict=False) for b in step]  # round-robin back together
        assert dealt == stream[: len(dealt)]
        first_epoch = [i for r in ranks for b in r[: per_epoch // world] for i in b]
        first_epoch += [i for r in range(per_epoch % world) for i in ranks[r][per_epoch // world]]
        assert sorted(first_epoch) == list(range(23)), "each sample exactly once per epoch across ranks"


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun")
def test_two_processes_equal_one_with_accumulation(tiny_model_dir, tmp_path):
    common = ["train.max_steps=5", "train.batch_size=2", "samples.prompts=[]", "train.eval_before=false"]
    one = run_training(tiny_recipe(tiny_model_dir, tmp_path / "one", *common, "train.grad_accum=2"))

    out = tmp_path / "two"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("name: tiny\n", encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    argv = [f"model={tiny_model_dir}", f"output_dir={out}", *TINY, *common]
    # `--nproc 2` becomes `torchrun --standalone --nproc_per_node=2 -m medtune.cli train ...`
    proc = subprocess.run([sys.executable, "-m", "medtune.cli", "train", str(recipe), *argv, "--nproc", "2"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(one.run_dir), abs=1e-4)
    a, b = (load_file(d / "adapter_model.safetensors") for d in (one.run_dir, out))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    assert proc.stdout.count("run: ") == 1, "only rank 0 reports"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5], "one row per step: rank 0 alone logs"
    assert json.loads((out / "metrics_final.json").read_text())["steps"] == 5

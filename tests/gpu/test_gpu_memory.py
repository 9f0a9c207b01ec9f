"""The memory estimate against the measured peak of a training on CUDA, at `medtune bench train`'s setting
(SmolLM2-135M, 4 packed rows x 512 tokens, LoRA r=64 on q/k/v/o, bf16), for LoRA and QLoRA.

The estimate is what `medtune data check` prints (and `medtune train` logs before loading any weight); the peak is
`torch.cuda.max_memory_allocated()` of the process that ran `medtune train`. Tolerance: RATIO bounds
estimate / measured. The estimate errs low by design (loading transients and allocator slack are not counted,
see medtune/train/memory.py), so it may be below the peak, but not by so much that a run it lets start runs out
of memory; nor may it be above the peak by enough to refuse runs that would fit. Both figures go to the JUnit
report (`memory_lora`, `memory_qlora` properties), which bench/gpu_check.sh copies into its summary."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from gpu_env import GPU, REPO, cli_env, medtune

pytestmark = GPU
GiB = 1024**3
RATIO = (0.6, 1.15)  # estimate / measured peak
SETTING = ["data.max_length=512", "train.batch_size=4", "lora.r=64", "lora.alpha=16", "lora.dropout=0.1",
           "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]", "train.precision=bf16", "train.device=cuda",
           "train.max_steps=3", "train.logging_steps=1", "data.eval_ratio=0", "train.eval_before=false",
           "samples.prompts=[]", "samples.from_eval=0", "eval.after_train=[]"]
METHODS = {"lora": [], "qlora": ["quant.load_in_4bit=true"]}
ESTIMATE = re.compile(r"estimated training memory ([0-9.]+) GiB")
# `medtune train ARGS` in this process, then its CUDA memory peaks as the last stdout line.
TRAIN_AND_MEASURE = ("import json, sys, torch\nfrom medtune.cli import main\nrc = main(sys.argv[1:])\n"
                     "print(json.dumps({'rc': rc, 'allocated': torch.cuda.max_memory_allocated(), "
                     "'reserved': torch.cuda.max_memory_reserved()}))")


@pytest.mark.parametrize("method", list(METHODS))
def test_memory_estimate_is_near_the_measured_cuda_peak(smollm2_dir, tmp_path, method, record_property):
    args = [str(REPO / "recipes" / "quickstart.yaml"), f"model={smollm2_dir}", f"output_dir={tmp_path / 'run'}",
            *SETTING, *METHODS[method]]
    found = ESTIMATE.search(medtune("data", "check", *args, cwd=tmp_path))
    assert found, "`medtune data check` printed no memory estimate"
    estimate = float(found.group(1)) * GiB

    proc = subprocess.run([sys.executable, "-c", TRAIN_AND_MEASURE, "train", *args], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peak["rc"] == 0, proc.stderr[-4000:]

    ratio = estimate / peak["allocated"]
    figures = {"estimate_gib": estimate / GiB, "peak_allocated_gib": peak["allocated"] / GiB,
               "peak_reserved_gib": peak["reserved"] / GiB, "estimate_over_peak": ratio, "tolerance": list(RATIO),
               "setting": SETTING + METHODS[method]}
    record_property(f"memory_{method}", json.dumps(figures))
    print(method, figures)
    assert RATIO[0] <= ratio <= RATIO[1], (f"{method}: estimate {estimate / GiB:.2f} GiB vs measured peak "
                                           f"{peak['allocated'] / GiB:.2f} GiB (ratio {ratio:.2f}, allowed {RATIO})")

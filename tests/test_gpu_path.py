"""The GPU check, checked on a machine without a GPU: every test in tests/gpu carries the registered `gpu` mark, a
default run deselects them all and `pytest -m gpu` skips them all with one clear reason; the summary that
bench/gpu_check.sh writes reads real pytest and `medtune bench train` output; a 4-bit base meant for `cuda` is
loaded onto the GPU (not left on the CPU, as {"": None} did)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from medtune.bench.harness import write_json
from medtune.bench.train_speed import BenchConfig, assemble, summarize_steps
from medtune.models import load_base_model, quantized_device_map
from medtune.recipe import QuantConfig

REPO = Path(__file__).resolve().parents[1]
GPU_TESTS = REPO / "tests" / "gpu"


class Tally:
    """A pytest plugin that counts what a nested run collected, deselected and how each test ended."""

    def __init__(self):
        self.collected, self.deselected, self.outcomes, self.skip_reasons = 0, 0, [], []

    def pytest_deselected(self, items):
        self.deselected += len(items)

    def pytest_collection_finish(self, session):
        self.collected = len(session.items)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.outcomes.append(report.outcome)
            if report.skipped:
                self.skip_reasons.append(report.longrepr[2])


def nested_pytest(*args: str) -> tuple[int, Tally]:
    tally = Tally()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[tally])
    return int(code), tally


def test_gpu_tests_are_deselected_by_default_and_skip_cleanly_without_cuda():
    code, default = nested_pytest("--collect-only", str(GPU_TESTS))
    assert code == pytest.ExitCode.NO_TESTS_COLLECTED and default.collected == 0
    assert default.deselected >= 15, "pyproject's addopts must deselect every test in tests/gpu"

    if torch.cuda.is_available():  # here they would run, not skip: only check that -m gpu selects them all
        code, selected = nested_pytest("--collect-only", "-m", "gpu", "--strict-markers", str(GPU_TESTS))
        assert code == 0 and selected.collected == default.deselected
        return
    code, run = nested_pytest("-m", "gpu", "--strict-markers", str(GPU_TESTS))
    assert code == 0 and run.collected == default.deselected and run.deselected == 0
    assert run.outcomes == ["skipped"] * run.collected
    assert {r.removeprefix("Skipped: ") for r in run.skip_reasons} == {
        "needs a CUDA GPU (torch.cuda.is_available() is False): run `make test-gpu` or bench/gpu_check.sh on one"}


def test_a_4bit_base_for_cuda_goes_to_the_current_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert quantized_device_map(torch.device("cuda")) == {"": 3}  # what pick_device("cuda") returns: no index
    assert quantized_device_map(torch.device("cuda", 1)) == {"": 1}
    assert quantized_device_map(torch.device("cpu")) == {"": "cpu"}

    seen = {}

    def from_pretrained(model_dir, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(RuntimeError, match="stop before loading"):
        load_base_model("unused", dtype=torch.bfloat16, device=torch.device("cuda"),
                        quant=QuantConfig(load_in_4bit=True))
    assert seen["device_map"] == {"": 3}


def gpu_summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", REPO / "bench" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PYTEST_RUN = '''
import json, pytest
def test_passes(record_property):
    record_property("memory_lora", json.dumps({"estimate_gib": 1.5, "peak_allocated_gib": 2.0}))
def test_fails():
    assert 1 == 2, "one is not two"
def test_skips():
    pytest.skip("no GPU here")
'''


def test_summary_reads_real_pytest_and_bench_output(tmp_path):
    gpu_summary = gpu_summary_module()
    (tmp_path / "test_sample.py").write_text(PYTEST_RUN, encoding="utf-8")
    code, _ = nested_pytest("--rootdir", str(tmp_path), "--junitxml", str(tmp_path / "junit.xml"),
                            str(tmp_path / "test_sample.py"))
    assert code == pytest.ExitCode.TESTS_FAILED
    steps = [{"step": i + 1, "tokens": 2000, "seconds": 0.5, "loss": 3.0 - 0.1 * i} for i in range(6)]
    systems = {name: {"steps": steps, "peak_rss_mb": 2500.0, "wall_s": 40.0, **summarize_steps(steps)}
               for name in ("medtune", "qlora")}
    base_params = 134_515_008
    bench = assemble(systems, {"bf16_tflops": 1.0}, cfg=BenchConfig(systems=("medtune", "qlora")),
                     base_params=base_params, data_spec="demo:terms", model_dir="m", command="medtune bench train",
                     load=((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)))
    write_json(tmp_path / "bench.json", bench)
    args = argparse.Namespace(junit=tmp_path / "junit.xml", tests_rc=1, bench=tmp_path / "bench.json", bench_rc=0,
                              phase=[("tests", 12.0)], note=[])

    got = gpu_summary.summarize(args, 500.0)

    tests = got["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"], tests["total"]) == (1, 1, 0, 1, 3)
    assert tests["failures"][0]["test"].endswith("::test_fails") and "one is not two" in tests["failures"][0]["message"]
    assert [(r.split(": ")[-1], n) for r, n in tests["skip_reasons"].items()] == [("no GPU here", 1)]
    assert got["memory"] == {"lora": {"estimate_gib": 1.5, "peak_allocated_gib": 2.0}}
    medtune = got["bench_train"]["systems"]["medtune"]
    assert medtune["tokens_per_s"] == pytest.approx(4000.0) and medtune["peak_rss_mb"] == 2500.0
    assert medtune["mfu_cuda_bf16_pct"] == pytest.approx(100 * 4000.0 * 4 * base_params / 500e12)
    assert got["bench_train"]["qlora_vs_lora"] == pytest.approx(1.0)
    assert got["ok"] is False and got["phases_s"] == {"tests": 12.0}
    assert got["gpu"]["cuda"] == torch.cuda.is_available() and got["versions"]["torch"] == torch.__version__


def test_summary_without_cuda_is_written_and_not_ok(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    out = tmp_path / "out" / "gpu_check.json"
    assert gpu_summary_module().main(["--out", str(out), "--no-peak", "--note", "no CUDA device visible"]) == 1
    got = json.loads(out.read_text())
    assert got["ok"] is False and got["tests"] is None and got["notes"] == ["no CUDA device visible"]

"""`medtune bench train`: the whole harness on the tiny model (seed, trl and medtune, each in its own process), then
the pieces it rests on: one text format every system tokenizes identically, the MFU arithmetic, the step summaries
and how a failing worker is reported."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from medtune.bench import train_speed as bench
from medtune.errors import MedtuneError
from medtune.models import bf16_supported


@pytest.fixture(scope="module")
def tiny_bench(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cfg = bench.BenchConfig(model=str(tiny_model_dir), steps=3, max_length=64, peak_seconds=0.2, timeout=300)
    returned = bench.run_bench(cfg, json_path=out, command="pytest")
    written = json.loads(out.read_text())
    assert written["systems"].keys() == returned["systems"].keys()
    return written


def test_every_system_trains_and_reports(tiny_bench):
    systems = tiny_bench["systems"]
    assert list(systems) == ["seed", "trl", "medtune", "qlora"]
    for name, s in systems.items():
        assert not s.get("error"), f"{name}: {s.get('error')}\n{s.get('stderr_tail', '')}"
        assert s["tokens_per_s"] > 0 and s["peak_rss_mb"] > 0 and s["wall_s"] > 0, name
        assert math.isfinite(s["loss"]) and math.isfinite(s["loss_equal_tokens"]), name
        assert len(s["steps"]) == 3 and s["measured_steps"] == 1, name
        assert s["mfu_bf16_pct"] > 0 and s["mfu_fp32_pct"] > 0, name
    assert systems["seed"]["setup"]["precision"] == "fp32" and systems["seed"]["setup"]["gradient_checkpointing"]
    assert systems["seed"]["setup"]["sampling"] == "group_by_length"
    assert systems["trl"]["sft_config"]["packing"] and systems["trl"]["sft_config"]["padding_free"]
    fast_bf16 = bf16_supported(torch.device("cpu"))  # TRL's fastest setup autocasts to bf16 only where that is fast
    assert systems["trl"]["sft_config"]["bf16"] == fast_bf16 and not systems["trl"]["sft_config"]["gradient_checkpointing"]
    assert systems["qlora"]["setup"]["base"] == "4-bit NF4" and systems["medtune"]["setup"]["base"] != "4-bit NF4"
    for key in ("speedup_vs_seed", "speedup_vs_trl", "qlora_vs_lora", "peak_bf16_tflops", "peak_fp32_tflops"):
        assert tiny_bench[key] > 0, key
    assert tiny_bench["machine"]["torch_threads"] >= 1 and tiny_bench["command"] == "pytest"


def test_every_system_trains_on_the_same_tokens(tiny_bench):
    systems = tiny_bench["systems"]
    per_step = {name: s["tokens_per_step"] for name, s in systems.items()}
    # 12 texts, 3 steps of 4: at max_length 64 every text fills a row on its own, so padded and packed systems
    # alike read each text once: seed and medtune exactly the same tokens, in another order; trl too
    assert systems["seed"]["tokens_total"] == systems["medtune"]["tokens_total"], per_step
    ref = per_step["medtune"]
    assert all(abs(v - ref) <= 0.1 * ref for v in per_step.values()), per_step


def test_the_table_shows_every_system(tiny_bench):
    table = bench.format_table(tiny_bench)
    for word in ("seed", "trl", "medtune", "qlora", "tokens/s", "peak RSS MB", "MFU bf16 %", "MFU fp32 %",
                 "medtune/seed", "qlora/medtune"):
        assert word in table


def test_the_table_shows_mfu_against_the_precision_each_run_used(tiny_bench):
    systems = tiny_bench["systems"]
    fast_bf16 = bf16_supported(torch.device("cpu"))
    assert systems["seed"]["mfu_precision"] == "fp32" and systems["trl"]["mfu_precision"] == ("bf16" if fast_bf16 else "fp32")
    for s in systems.values():
        assert s["mfu_pct"] == s[f"mfu_{s['mfu_precision']}_pct"]
    row = next(line for line in bench.format_table(tiny_bench).splitlines() if line.startswith("seed "))
    assert f"{systems['seed']['mfu_pct']:.2f} fp32" in row


def test_run_precision_reads_the_workers_setup():
    assert bench.run_precision({"precision": "fp32"}) == "fp32"
    assert bench.run_precision({"precision": "bf16 autocast (fp32 weights)"}) == "bf16"
    assert bench.run_precision({"precision": "auto → fp32"}) == "fp32"
    assert bench.run_precision({"precision": "auto → bf16"}) == "bf16"
    assert bench.run_precision({"precision": "auto → bf16", "device": "cuda"}) == "cuda_bf16"


def test_mfu_of_a_gpu_run_is_against_the_gpus_peak():
    steps = [{"tokens": 1000, "seconds": 1.0, "loss": 2.0}] * 4
    runs = {name: {"tokens_per_s": 1000.0, "tokens_total": 4000, "steps": steps, "setup": setup,
                   "tokens_per_step": 1000, "peak_rss_mb": 1.0, "loss": 2.0, "wall_s": 4.0}
            for name, setup in (("seed", {"precision": "fp32"}),
                                ("medtune", {"precision": "auto → bf16", "device": "cuda"}))}
    peak = bench.best_peak([{"bf16_tflops": 0.4, "fp32_tflops": 0.2, "cuda_bf16_tflops": 500.0,
                             "cuda_fp32_tflops": 50.0}])
    cfg = bench.BenchConfig()
    result = bench.assemble(runs, peak, cfg=cfg, base_params=100_000_000, data_spec="d", model_dir="m",
                            command="c", load=((0.0,), (0.0,)))
    fpt = bench.flops_per_token(100_000_000)
    assert result["peak_cuda_bf16_tflops"] == 500.0
    assert result["systems"]["medtune"]["mfu_pct"] == pytest.approx(100 * 1000 * fpt / 500e12)
    assert result["systems"]["seed"]["mfu_pct"] == pytest.approx(100 * 1000 * fpt / 0.2e12)
    assert "GPU bf16 500.0" in bench.format_table({**result, "machine": {**result["machine"], "torch_threads": 2}})


# ---- the text every system reads ---------------------------------------------------------------------------

def test_format_text_is_the_seed_prompt_with_the_tokenizers_strings():
    text = bench.format_text(" Gout ", "Gout is a form of arthritis.\n", "<|im_start|>", "<|im_end|>")
    assert text == "<|im_start|>[INST] Please tell me about Gout [/INST] Gout is a form of arthritis. <|im_end|>"
    assert bench.format_text("Gout", "Gout hurts.", "", "</s>") == "[INST] Please tell me about Gout [/INST] Gout hurts. </s>"


def test_row_text_takes_title_and_text_or_a_ready_text():
    assert bench.row_text({"page_title": "Acne", "page_text": "Spots."}, "<s>", "</s>").startswith("<s>[INST]")
    assert bench.row_text({"text": "ready"}, "<s>", "</s>") == "ready"
    assert bench.row_text({"page_title": "Acne", "page_text": "  "}, "<s>", "</s>") is None


class _NoAutoBos:
    bos_token, bos_token_id, eos_token = "<|im_start|>", 1, "<|im_end|>"

    def __call__(self, text):
        return {"input_ids": [7]}


def test_bos_string_is_written_only_when_the_tokenizer_does_not_add_it(tiny_tokenizer):
    assert bench.special_strings(_NoAutoBos()) == ("<|im_start|>", "<|im_end|>")  # SmolLM2's tokenizer adds none
    assert bench.special_strings(tiny_tokenizer) == ("", "</s>")  # LLaMA-style: prepends <s> itself


def test_trl_and_medtune_tokenize_the_text_identically(tiny_tokenizer):
    """TRL: `tok(text)` (eos already there), truncated keep-start; medtune: format=text rendering."""
    from medtune.data.formats import Example
    from medtune.data.render import render
    from medtune.recipe import DataConfig

    bos, eos = bench.special_strings(tiny_tokenizer)
    short = bench.format_text("Gout", "Gout is a form of arthritis.", bos, eos)
    long = bench.format_text("Fever", " ".join(["The patient has a fever and a cough."] * 20), bos, eos)
    for text in (short, long):
        trl_ids = tiny_tokenizer(text=text)["input_ids"][:64]
        sample, _ = render(Example("x", 1, text=text), tiny_tokenizer, DataConfig(format="text", max_length=64), [eos])
        assert sample.input_ids == trl_ids and sample.labels == trl_ids  # all tokens train
        assert trl_ids.count(tiny_tokenizer.bos_token_id) == 1 and trl_ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer(text=short)["input_ids"][-1] == tiny_tokenizer.eos_token_id


def test_build_texts_samples_steps_times_batch_rows(write_file, tiny_tokenizer):
    rows = "".join(json.dumps({"page_title": f"T{i}", "page_text": f"Body {i}."}) + "\n" for i in range(50))
    path = write_file("terms.jsonl", rows)
    texts = bench.build_texts(str(path), tiny_tokenizer, 12)
    assert len(texts) == len(set(texts)) == 12 and texts == bench.build_texts(str(path), tiny_tokenizer, 12)
    assert len(bench.build_texts(str(path), tiny_tokenizer, 80)) == 50
    with pytest.raises(MedtuneError):
        bench.build_texts(str(write_file("bad.jsonl", '{"q": 1}\n')), tiny_tokenizer, 4)


# ---- arithmetic ------------------------------------------------------------------------------------------------

def test_mfu_arithmetic():
    assert bench.flops_per_token(134_515_008) == 4 * 134_515_008
    # 1000 tokens/s x 538 MFLOP/token = 0.538 TFLOP/s of useful work; on a 2 TFLOP/s peak that is 26.9 %
    assert bench.mfu(1000.0, 4 * 134_500_000, 2.0) == pytest.approx(0.269)
    assert bench.mfu(500.0, 4e8, 0.1) == pytest.approx(2.0)  # more than the peak is reported, not clipped
    assert math.isnan(bench.mfu(1000.0, 4e8, 0.0))


def test_base_parameters_count_a_tied_embedding_once(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = sum(p.numel() for p in model.parameters())
    assert bench.count_base_params(str(tiny_model_dir)) == unique
    assert unique == sum(p.numel() for _, p in model.named_parameters()) < unique + model.lm_head.weight.numel()


def test_summarize_steps_leaves_out_warm_up_and_averages_the_last_quarter():
    steps = [{"tokens": 100, "seconds": 10.0, "loss": 4.0}, {"tokens": 100, "seconds": 5.0, "loss": 3.0}] + \
            [{"tokens": 200, "seconds": 1.0, "loss": float(k)} for k in range(8)]
    s = bench.summarize_steps(steps)
    assert s["tokens_per_s"] == pytest.approx(200.0) and s["measured_steps"] == 8
    assert s["tokens_total"] == 1800 and s["tokens_per_step"] == 180.0 and s["train_s"] == 23.0
    assert s["loss"] == pytest.approx((5 + 6 + 7) / 3)  # ceil(10 x 0.25) = 3 last steps
    assert s["tokens_per_s_median"] == pytest.approx(200.0)


def test_loss_at_equal_tokens_compares_bigger_steps_at_the_same_token_count():
    small = [{"tokens": 100, "loss": 10.0 - k} for k in range(8)]  # 800 tokens
    big = [{"tokens": 200, "loss": 10.0 - k} for k in range(8)]  # 1600 tokens
    assert bench.loss_at_tokens(small, 800) == pytest.approx((4 + 3) / 2)  # cumulative 700 and 800 are > 600
    assert bench.loss_at_tokens(big, 800) == pytest.approx(7.0)  # only cumulative 800 is in (600, 800]
    assert bench.loss_at_tokens([{"tokens": 1000, "loss": 2.0}], 800) == 2.0  # first step already past the window


def test_losses_are_weighted_by_tokens():
    # a full step and the short last step of an epoch: the short one weighs by its tokens, not as a whole step
    steps = [{"tokens": 900, "seconds": 1.0, "loss": 2.0}] * 3 + [{"tokens": 300, "seconds": 1.0, "loss": 4.0}]
    assert bench.summarize_steps(steps)["loss"] == pytest.approx(4.0)  # ceil(4 x 0.25) = the last step only
    assert bench.summarize_steps(steps, tail=0.5)["loss"] == pytest.approx((900 * 2.0 + 300 * 4.0) / 1200)
    # cumulative 1800, 2700 and 3000 are in (1500, 3000]
    assert bench.loss_at_tokens(steps, 3000, tail=0.5) == pytest.approx((1800 * 2.0 + 300 * 4.0) / 2100)
    assert math.isnan(bench.token_mean([{"tokens": 0, "loss": 1.0}]))


def test_bench_config_from_flags():
    assert (bench.bench_config().steps, bench.bench_config().max_length) == (30, 512)
    quick = bench.bench_config(quick=True)
    assert (quick.steps, quick.max_length, quick.systems) == (8, 256, ("seed", "trl", "medtune", "qlora"))
    assert bench.bench_config(quick=True, steps=5, max_length=128).steps == 5
    assert bench.bench_config(systems="medtune, seed,medtune").systems == ("medtune", "seed")
    with pytest.raises(MedtuneError, match="unknown system"):
        bench.bench_config(systems="seed,unsloth")
    with pytest.raises(MedtuneError, match="at least 3"):
        bench.bench_config(steps=2)


def test_the_trl_systems_need_the_bench_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(MedtuneError, match=r"the seed systems train with TRL: pip install 'medtune\[bench\]'"):
        bench.bench_config(systems="seed,medtune")
    assert bench.bench_config(systems="medtune,qlora").systems == ("medtune", "qlora")  # these need no TRL


def test_a_failing_worker_is_an_error_result_not_a_crash():
    res, wall = bench.run_subprocess([sys.executable, "-c", "import sys; print('noise'); "
                                      "print('ValueError: boom', file=sys.stderr); sys.exit(3)"])
    assert res["error"] == "exit code 3: ValueError: boom" and wall > 0
    res, _ = bench.run_subprocess([sys.executable, "-c", "import json; print('log line'); "
                                   "print(json.dumps({'system': 'trl', 'error': 'OSError: no'})); raise SystemExit(1)"])
    assert res == {"system": "trl", "error": "OSError: no"}
    res, _ = bench.run_subprocess([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.5)
    assert res["error"].startswith("timed out")


def test_the_peak_is_the_best_of_the_runs():
    best = bench.best_peak([{"bf16_tflops": 0.2, "fp32_tflops": 0.18}, {"bf16_tflops": 0.42, "fp32_tflops": 0.09},
                            {"error": "exit code 1: killed"}])
    assert (best["bf16_tflops"], best["fp32_tflops"], len(best["runs"])) == (0.42, 0.18, 3) and "error" not in best
    assert bench.best_peak([{"error": "boom"}])["error"] == "boom"


def test_sigterm_kills_the_running_worker_instead_of_orphaning_it(monkeypatch, tmp_path):
    import os
    import signal
    import threading

    pid_file = tmp_path / "worker.pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"

    def fake_run(cfg, **kwargs):
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return bench.run_subprocess([sys.executable, "-c", script])

    monkeypatch.setattr(bench, "_run_bench", fake_run)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        bench.run_bench(bench.BenchConfig())
    assert stop.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # killed and reaped

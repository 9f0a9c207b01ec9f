"""lm-evaluation-harness end to end on the tiny LLaMA: medtune's scorer gives lm-eval's stock HFLM's
log-likelihoods, and a real `simple_evaluate` run on a local benchmark file gives the same per-item accuracy."""

from __future__ import annotations

import json

import pytest

from medtune.eval.calibration import ece
from medtune.eval.harness import make_lm, offline_env, prepare_tasks, run_benchmark
from medtune.generate import load_for_inference

QUESTIONS = [("What is the usual treatment for {c}?", "Rest and fluids"), ("Which organ does {c} affect?", "The lungs"),
             ("Is {c} contagious?", "Sometimes")]
CONDITIONS = ["fever", "asthma", "anemia", "gout", "eczema", "migraine"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_inference(str(tiny_model_dir), precision="fp32")


@pytest.fixture(scope="module")
def medqa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "medqa.jsonl"
    rows = []
    for n, c in enumerate(CONDITIONS):
        q, a = QUESTIONS[n % 3]
        options = {"A": a, "B": "Surgery at once", "C": "Nothing at all", "D": f"Ask about {c}"}
        rows.append({"question": q.format(c=c), "options": options, "answer_idx": "ABCD"[n % 4]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loglikelihoods_equal_stock_hflm(loaded):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    pairs = [("Question: what is fever?\nAnswer:", " A"), ("Question: what is fever?\nAnswer:", " B"),
             ("Abstract: rest helps.\nQuestion: does rest help?\nAnswer:", " maybe"),
             ("The patient reports a cough", " for three days and has no other complaints."), ("Hi", " there")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    stock = HFLM(pretrained=loaded.model, tokenizer=loaded.tok, batch_size=1).loglikelihood(requests)
    ours = make_lm(loaded, batch_size=3).loglikelihood(requests)
    assert [g for _, g in ours] == [g for _, g in stock]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in stock], rel=1e-4)


def test_simple_evaluate_end_to_end_matches_stock_hflm(loaded, medqa_file, tmp_path):
    offline_env()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours = run_benchmark(loaded, "medqa", medqa_file, batch_size=4)
    assert ours.metrics["n"] == len(CONDITIONS) and len(ours.items) == len(CONDITIONS)
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(ours.metrics)
    names, _ = prepare_tasks("medqa", medqa_file, tmp_path)
    stock = simple_evaluate(model=HFLM(pretrained=loaded.model, tokenizer=loaded.tok, batch_size=1), tasks=names,
                            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    want = stock["results"]["medtune_medqa"]
    assert ours.metrics["acc"] == pytest.approx(want["acc,none"])
    assert ours.metrics["acc_stderr"] == pytest.approx(want["acc_stderr,none"])
    assert ours.metrics["acc_norm"] == pytest.approx(want["acc_norm,none"])
    per_item = sorted(stock["samples"]["medtune_medqa"], key=lambda s: s["doc_id"])
    assert [i["acc"] for i in ours.items] == [s["acc"] for s in per_item]
    # calibration from the stock harness's option log-likelihoods (softmax by torch); ece() itself: test_calibration
    import torch

    probs = [torch.softmax(torch.tensor([r[0] for r in s["filtered_resps"]], dtype=torch.float64), 0) for s in per_item]
    gold = [s["target"] for s in per_item]
    brier = [float(((p - torch.nn.functional.one_hot(torch.tensor(g), len(p))) ** 2).sum()) for p, g in zip(probs, gold, strict=True)]
    assert ours.metrics["brier"] == pytest.approx(sum(brier) / len(brier), rel=1e-4)
    assert [i["confidence"] for i in ours.items] == pytest.approx([float(p.max()) for p in probs], rel=1e-4)
    assert ours.metrics["ece"] == pytest.approx(ece([float(p.max()) for p in probs],
                                                              [s["acc"] for s in per_item]), rel=1e-4, abs=1e-9)


def test_fewshot_prompt_uses_the_shot_file(loaded, medqa_file, write_file, tmp_path):
    shots = write_file("shots.jsonl", json.dumps({"question": "UNIQUE SHOT QUESTION", "answer_idx": "A",
                                                  "options": {"A": "a", "B": "b", "C": "c", "D": "d"}}) + "\n")
    offline_env()
    from lm_eval.tasks import TaskManager

    names, _ = prepare_tasks("medqa", medqa_file, tmp_path, fewshot=1, fewshot_data=shots, limit=2)
    task = TaskManager(include_path=str(tmp_path), include_defaults=False).load_task_or_group(names)[names[0]]
    task.set_config(key="num_fewshot", value=1)
    task.build_all_requests(limit=2, rank=0, world_size=1)
    context = task.instances[0].arguments[0]
    assert context.startswith("Question: UNIQUE SHOT QUESTION") and context.count("Answer:") == 2
    result = run_benchmark(loaded, "medqa", medqa_file, fewshot=1, fewshot_data=shots, limit=2)
    assert result.metrics["n"] == 2

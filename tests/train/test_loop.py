"""The owned training loop on the tiny LLaMA: it learns, it is deterministic, accumulation is exact,
resume is exact, and the run directory reloads as trained."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
from conftest import losses, tiny_recipe
from safetensors.torch import load_file

from medtune.recipe import load_recipe
from medtune.run.card import number
from medtune.train.job import run_training

# Losses of the first 5 steps of conftest's `tiny_recipe` (fp32, seed 42). If a change moves them, it changed what is
# trained (data order, masking, loss normalisation, optimizer) — find out why before updating them. They
# also depend on the tiny tokenizer, which conftest trains on the demo data.
GOLDEN_LOSSES = [6.418767340829439, 6.377393713662791, 6.365515523366799, 6.342292995627867, 6.348473890772405]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    return run_training(tiny_recipe(tiny_model_dir, out, "train.save_steps=2"))


def test_weights_change_and_loss_falls(trained):
    adapter = load_file(trained.run_dir / "adapter_model.safetensors")
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b), "LoRA B starts at zero; training must move it"
    got = losses(trained.run_dir)
    assert len(got) == 5 and got[-1] < got[0]
    assert trained.metrics["eval_loss"] < trained.metrics["base_eval_loss"]


def test_golden_loss(trained):
    got = losses(trained.run_dir)
    assert got == pytest.approx(GOLDEN_LOSSES, rel=1e-4)


def test_deterministic(tiny_model_dir, tmp_path, trained):
    again = run_training(tiny_recipe(tiny_model_dir, tmp_path / "again", "train.save_steps=2"))
    assert losses(again.run_dir) == pytest.approx(losses(trained.run_dir), rel=1e-6)


def test_grad_accum_equals_big_batch(tiny_model_dir, tmp_path):
    # batch 4 x accum 1 and batch 2 x accum 2 see the same 4 examples per update (same seeded order) and
    # normalise by the window's loss tokens, so updates and losses match.
    big = run_training(tiny_recipe(tiny_model_dir, tmp_path / "big", "train.max_steps=3"))
    acc = run_training(tiny_recipe(tiny_model_dir, tmp_path / "acc", "train.max_steps=3", "train.batch_size=2",
                                   "train.grad_accum=2"))
    assert losses(acc.run_dir) == pytest.approx(losses(big.run_dir), rel=1e-5)
    a, b = (load_file(r.run_dir / "adapter_model.safetensors") for r in (big, acc))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path, trained):
    # Copy the finished run, keep only its step-2 checkpoint, resume: steps 3-5 must reproduce the same adapter.
    run = tmp_path / "resumed"
    shutil.copytree(trained.run_dir, run)
    for ckpt in (run / "checkpoints").iterdir():
        if ckpt.name != "step-0000002":
            shutil.rmtree(ckpt)
    (run / "adapter_model.safetensors").unlink()
    resumed = run_training(tiny_recipe(tiny_model_dir, run, "train.save_steps=2", "resume=true"))
    a = load_file(trained.run_dir / "adapter_model.safetensors")
    b = load_file(resumed.run_dir / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_run_dir_reloads_as_trained(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run = trained.run_dir
    meta = json.loads((run / "medtune.json").read_text())
    tok = AutoTokenizer.from_pretrained(run)
    gen = GenerationConfig.from_pretrained(run)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in gen.eos_token_id, "ChatML runs must stop on <|im_end|>"
    assert gen.pad_token_id not in gen.eos_token_id and tok.pad_token_id not in gen.eos_token_id
    assert meta["stop_token_ids"] == gen.eos_token_id
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run)
    assert any("lora" in n for n, _ in model.named_parameters())
    assert load_recipe(run / "recipe.yaml").lora.r == 4
    for name in ("README.md", "metrics.jsonl", "data_report.json", "plots/loss.png", "plots/learning_rate.png",
                 "plots/grad_norm.png"):
        assert (run / name).is_file(), name
    card = (run / "README.md").read_text()
    assert "not medical advice" in card.lower()
    # the card names no local folder: not the run's, not the base model's (both absolute temp paths here)
    assert str(run.parent) not in card and str(tiny_model_dir) not in card and f"`{tiny_model_dir.name}`" in card
    held_out = f"| perplexity | {number(trained.metrics['base_eval_ppl'])} | {number(trained.metrics['eval_ppl'])} |"
    assert held_out in card and card.count(number(trained.metrics["eval_ppl"])) == 1


@pytest.mark.parametrize("extra", [["train.packing=true"], ["train.group_by_length=true"],
                                   ["train.gradient_checkpointing=true"], ["lora.use_dora=true", "lora.use_rslora=true"],
                                   ["train.precision=bf16", "train.optimizer=adamw_fused"]])
def test_training_options_run(tiny_model_dir, tmp_path, extra):
    result = run_training(tiny_recipe(tiny_model_dir, tmp_path / "opt", "train.max_steps=3", *extra))
    got = losses(result.run_dir)
    assert len(got) == 3 and all(torch.isfinite(torch.tensor(got)))


def test_packing_trains_on_the_same_tokens(tiny_model_dir, tmp_path):
    padded = run_training(tiny_recipe(tiny_model_dir, tmp_path / "pad", "train.max_steps=1", "train.batch_size=18"))
    packed = run_training(tiny_recipe(tiny_model_dir, tmp_path / "pack", "train.max_steps=1", "train.batch_size=18",
                                      "train.packing=true"))
    # One step over all 18 training rows: same examples, same loss whether padded or packed.
    assert losses(packed.run_dir) == pytest.approx(losses(padded.run_dir), rel=1e-4)


def test_new_run_never_overwrites(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tiny_model_dir, "unused", "train.max_steps=1")
    recipe.output_dir = None
    recipe.name = "same"
    first = run_training(recipe)
    second = run_training(recipe)
    assert first.run_dir.name == "same" and second.run_dir.name == "same-2"


def test_sample_prompts_come_from_held_out_rows_with_repetition_control(tiny_model_dir, tmp_path, monkeypatch):
    from medtune.data.prepare import prepare_data
    from medtune.data.readers import read_rows
    from medtune.models import load_tokenizer
    from medtune.tokenizer import prepare_tokenizer
    from medtune.train import job

    calls = []
    real_generate = job.generate
    monkeypatch.setattr(job, "generate", lambda *a, **kw: calls.append(kw) or real_generate(*a, **kw))
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", "train.max_steps=1", "samples.from_eval=3",
                         "samples.max_new_tokens=4", "samples.repetition_penalty=1.3",
                         "samples.no_repeat_ngram_size=3", 'samples.prompts=["What is gout?"]')
    result = run_training(recipe)
    meta = json.loads((result.run_dir / "data_report.json").read_text())
    assert meta["eval"]["kept"] == 6  # 25% of 24 rows held out
    questions = {r.number: r.data["question"] for r in read_rows("demo:qa")}
    tok = load_tokenizer(str(tiny_model_dir))
    data = prepare_data(recipe, tok, prepare_tokenizer(tok, recipe.tokenizer))
    held_out = [questions[s.row] for s in data.eval[:3]]
    trained_on = {questions[s.row] for s in data.train}
    assert [s["prompt"] for s in result.samples] == ["What is gout?", *held_out]
    answers = {r.number: r.data["answer"] for r in read_rows("demo:qa")}
    assert [s.get("reference") for s in result.samples] == [None, *(answers[s.row] for s in data.eval[:3])]
    assert data.eval_references[:3] == [answers[s.row] for s in data.eval[:3]]
    assert not trained_on & set(held_out)
    assert len(calls) == 8 and all(kw["repetition_penalty"] == 1.3 and kw["no_repeat_ngram_size"] == 3
                                   for kw in calls)


def test_generate_applies_repetition_control(tiny_model_dir):
    from medtune.generate import (
        NO_REPEAT_NGRAM_SIZE,
        REPETITION_PENALTY,
        generate,
        load_for_inference,
        user_turn,
    )

    loaded = load_for_inference(str(tiny_model_dir), precision="fp32")
    seen = []
    real = loaded.model.generate
    loaded.model.generate = lambda **kw: seen.append(kw) or real(**kw)

    class Ids:  # the streamer protocol: the prompt first, then each new token
        def __init__(self):
            self.ids = None

        def put(self, value):
            self.ids = [] if self.ids is None else self.ids + value.reshape(-1).tolist()

        def end(self):
            pass

    generate(loaded, user_turn("What is gout?"), max_new_tokens=8)
    penalty, ngram = (p.processor for p in seen[-1]["logits_processor"])  # both see the answer's tokens only
    assert (penalty.penalty, ngram.ngram_size) == (REPETITION_PENALTY, NO_REPEAT_NGRAM_SIZE)
    assert seen[-1]["logits_processor"][0].prompt_length == seen[-1]["input_ids"].shape[1]
    loops, free = Ids(), Ids()
    generate(loaded, user_turn("What is gout?"), max_new_tokens=40, streamer=loops, repetition_penalty=1.0,
             no_repeat_ngram_size=0)
    generate(loaded, user_turn("What is gout?"), max_new_tokens=40, streamer=free, no_repeat_ngram_size=2)
    bigrams = list(itertools.pairwise(free.ids))
    assert len(set(bigrams)) == len(bigrams)  # no token pair twice
    plain = list(itertools.pairwise(loops.ids))
    assert len(set(plain)) < len(plain), "the untrained tiny model loops when nothing stops it"


def test_held_out_perplexity_is_measured_once_per_model_and_reused(tiny_model_dir, tmp_path, monkeypatch):
    import medtune.eval.perplexity as ppl

    passes = []
    real = ppl.score
    spy = lambda model, wins, *a, **kw: passes.append(len(wins)) or real(model, wins, *a, **kw)  # noqa: E731
    monkeypatch.setattr(ppl, "score", spy)  # every held-out pass, eval.perplexity's or the objective's
    result = run_training(tiny_recipe(tiny_model_dir, tmp_path / "run", "train.max_steps=2",
                                      "eval.after_train=[perplexity]", "eval.gate=true"))
    assert len(passes) == 2  # the base before training, the tuned model after; eval.after_train and the gate reuse them
    compared = json.loads((result.run_dir / "eval" / "perplexity.json").read_text())["perplexity"]
    assert compared["base"]["perplexity"] == result.metrics["base_eval_ppl"]
    assert compared["tuned"]["perplexity"] == result.metrics["eval_ppl"]
    assert compared["delta"]["perplexity"]["n"] == 6
    gate = json.loads((result.run_dir / "gate.json").read_text())
    ppl_axis = next(a for a in gate["axes"] if a["axis"] == "perplexity.perplexity")
    assert (ppl_axis["base"], ppl_axis["tuned"]) == (compared["base"]["perplexity"], compared["tuned"]["perplexity"])
    assert (result.run_dir / "plots" / "perplexity.png").is_file()

"""Each phase of the trainer on the tiny LLaMA, without the whole training: what it sets up, one step, held-out
evaluation, and a checkpoint a new trainer resumes from."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file
from test_loop import GOLDEN_LOSSES

from medtune.data.batching import iterate
from medtune.data.prepare import PreparedData, prepare_data
from medtune.models import load_tokenizer, resolve_model
from medtune.tokenizer import prepare_tokenizer
from medtune.train.job import run_training
from medtune.train.runtime import start_runtime
from medtune.train.trainer import Trainer


def build(recipe) -> tuple[Trainer, PreparedData]:
    """A trainer as the job builds it, and its prepared data; no phase run yet."""
    model_dir = resolve_model(recipe.model)
    tok = load_tokenizer(model_dir)
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    return Trainer(recipe, start_runtime(recipe), recipe.run_dir, model_dir, tok, chat), prepare_data(recipe, tok, chat)


def ready(recipe) -> Trainer:
    """A trainer through setup_model, setup_data, setup_optimizer and start_tracking."""
    trainer, data = build(recipe)
    trainer.setup_model()
    trainer.setup_data(data)
    trainer.setup_optimizer()
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    trainer.start_tracking()
    return trainer


def test_setup_model_trains_the_adapter_only(tiny_model_dir, tmp_path):
    trainer, _ = build(tiny_recipe(tiny_model_dir, tmp_path / "run"))
    trainer.setup_model()
    named = dict(trainer.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert any(not p.requires_grad for n, p in named.items() if "lora_" not in n)
    assert {id(p) for p in trainer.params} == {id(named[n]) for n in trainable}
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert all(named[n].abs().max() == 0 for n in trainable if "lora_B" in n)  # LoRA B starts at zero
    assert {named[n].shape[0] for n in trainable if "lora_A" in n} == {4}  # lora.r=4


def test_setup_data_plans_batches_and_steps(tiny_model_dir, tmp_path):
    trainer, data = build(tiny_recipe(tiny_model_dir, tmp_path / "run", "train.max_steps=0", "train.epochs=2",
                                      "train.grad_accum=2"))
    trainer.setup_data(data)
    assert len(trainer.data.train) == 18 and len(trainer.plan) == 5  # 24 rows, 25 % held out; batches of 4
    assert sorted(i for b in trainer.plan.batches(0) for i in b) == list(range(18))  # each row once per epoch
    assert trainer.steps_per_epoch == 3 and trainer.total_steps == 6  # ceil(5 micro-batches / 2) x 2 epochs
    assert not trainer.plan.packing
    # resume: the stream after 5 consumed micro-batches starts at epoch 1's first one
    stream = trainer.micro_batches(5)
    first = next(iterate(trainer.data.train, trainer.plan, 1, trainer.chat.pad_token_id, "right"))
    assert torch.equal(next(stream).input_ids, first.input_ids)
    packed, data = build(tiny_recipe(tiny_model_dir, tmp_path / "packed", "train.packing=true"))
    packed.setup_data(data)
    assert packed.plan.packing and packed.total_steps == 5


def test_setup_optimizer_groups_and_schedule(tiny_model_dir, tmp_path):
    trainer = ready(tiny_recipe(tiny_model_dir, tmp_path / "run", "train.warmup_steps=2", "train.lr_scheduler=linear",
                                "train.weight_decay=0.01"))
    opt = trainer.optimizer
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainer.params]
    assert group["weight_decay"] == 0.01 and trainer.warmup == 2 and trainer.state.step == 0
    rates = [trainer.scheduler.get_last_lr()[0]]
    for _ in range(5):
        opt.step()  # no gradients yet: nothing moves
        trainer.scheduler.step()
        rates.append(trainer.scheduler.get_last_lr()[0])
    assert rates == pytest.approx([0, 0.5e-2, 1e-2, 2e-2 / 3, 1e-2 / 3, 0])  # warm-up 2, then linear to 0 at 5
    sgd = ready(tiny_recipe(tiny_model_dir, tmp_path / "sgd", "train.optimizer=sgd"))
    assert isinstance(sgd.optimizer, torch.optim.SGD) and sgd.optimizer.param_groups[0]["momentum"] == 0.9


def test_one_fit_step_moves_lora_only_and_matches_the_golden_loss(tiny_model_dir, tmp_path):
    trainer = ready(tiny_recipe(tiny_model_dir, tmp_path / "run", "train.max_steps=1"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    assert all(after[n].abs().max() > 0 for n in before if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert trainer.state.step == 1 and trainer.state.micro == 1
    assert trainer.last_logged["loss"] == pytest.approx(GOLDEN_LOSSES[0], rel=1e-4)  # the whole run's first step
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["loss"] == trainer.last_logged["loss"]


def test_evaluate_equals_the_whole_runs_eval_loss(tiny_model_dir, tmp_path):
    extra = ("train.max_steps=2", "train.eval_before=false", "samples.prompts=[]")
    whole = run_training(tiny_recipe(tiny_model_dir, tmp_path / "whole", *extra))
    trainer = ready(tiny_recipe(tiny_model_dir, tmp_path / "phases", *extra))
    trainer.fit()
    got = trainer.evaluate()
    assert set(got) == {"eval_loss", "eval_ppl", "eval_tokens"}
    assert got["eval_loss"] == pytest.approx(whole.metrics["eval_loss"], rel=1e-6)
    assert got["eval_tokens"] == whole.metrics["eval_tokens"]
    assert trainer.model.training  # evaluation gives the model back in training mode


def test_save_checkpoint_writes_what_resume_reads(tiny_model_dir, tmp_path):
    trainer = ready(tiny_recipe(tiny_model_dir, tmp_path / "run", "train.max_steps=1"))
    trainer.fit()
    path = trainer.save_checkpoint()
    assert path == tmp_path / "run" / "checkpoints" / "step-0000001"
    assert {p.name for p in path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                "trainer_state.json", "training.pt"}  # (and peft's README.md)
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 1, "base_eval": {}, "micro": 1,
                                                                      "skipped": []}
    saved = load_file(path / "adapter_model.safetensors")
    resumed = ready(tiny_recipe(tiny_model_dir, tmp_path / "run", "train.max_steps=2", "resume=true"))
    assert resumed.state.step == 1 and resumed.state.micro == 1
    weights = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert len(weights) == len(saved)
    for key, tensor in saved.items():
        match = [p for n, p in weights.items() if n.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0].detach(), tensor), key
    assert resumed.optimizer.state_dict()["state"]  # AdamW's moments came back with the checkpoint

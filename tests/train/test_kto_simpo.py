"""KTO, SimPO, DPO's loss types and train.precompute_reference in the trainer: each objective's loss through the
LossModule equals losses.py on the same batch's log-probs; KTO and SimPO training moves the adapter and widens the
reward margin; a precomputed reference gives the per-step reference's losses without its forward pass; and a
preference run resumed from a checkpoint equals the uninterrupted one."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext

import pytest
import torch
from conftest import losses, tiny_recipe
from safetensors.torch import load_file

from medtune.data.batching import BatchPlan, FeedbackBatch, iterate
from medtune.data.prepare import prepare_data
from medtune.models import add_lora, load_base_model, load_tokenizer, resolve_model
from medtune.recipe import LoraConfig, TrainConfig, load_recipe
from medtune.tokenizer import prepare_tokenizer
from medtune.train.job import run_training
from medtune.train.objectives import LossModule, evaluate, get_objective
from medtune.train.objectives.dpo import DPO
from medtune.train.objectives.kto import KTO
from medtune.train.objectives.logps import token_logps
from medtune.train.objectives.losses import dpo_loss, kto_loss, simpo_loss
from medtune.train.objectives.reference import ReferencedBatch, precompute_reference
from medtune.train.objectives.simpo import SimPO
from medtune.train.runtime import start_runtime
from medtune.train.trainer import Trainer

NO_AUTOCAST = nullcontext()
PAIRS = ("data.path=demo:preferences", "data.format=preference")
FEEDBACK = ("data.path=demo:feedback", "data.format=feedback")


def _rows(model_dir, data: tuple[str, ...], objective: str, limit: int = 8):
    recipe = load_recipe(None, [f"model={model_dir}", *data, f"data.limit={limit}", "data.eval_ratio=0",
                                "data.max_length=128", f"train.objective={objective}"])
    tok = load_tokenizer(str(model_dir))
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    return prepare_data(recipe, tok, chat).train, chat.pad_token_id


@pytest.fixture(scope="module")
def pairs(tiny_model_dir):
    return _rows(tiny_model_dir, PAIRS, "dpo")


@pytest.fixture(scope="module")
def feedback(tiny_model_dir):
    return _rows(tiny_model_dir, FEEDBACK, "kto")


def _lora(model_dir, perturb: bool):
    """The tiny LLaMA with a LoRA adapter in fp32, without dropout; `perturb`: LoRA B moved off zero, so that the
    policy differs from the reference (adapter off)."""
    model = add_lora(load_base_model(str(model_dir), dtype=torch.float32, device=torch.device("cpu")),
                     LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    if perturb:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return _lora(tiny_model_dir, perturb=True)


# ---- the LossModule's loss is losses.py's on token_logps -------------------------------------------------------

def _pair_logps(model, batch):
    """(policy summed log-probs, answer token counts, reference summed log-probs), each (2N,)."""
    logps, counts = token_logps(model, batch, NO_AUTOCAST)
    with torch.no_grad(), model.disable_adapter():
        ref = token_logps(model, batch, NO_AUTOCAST)[0]
    return logps, counts, ref


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.2), ("hinge", 0.0)])
def test_dpo_loss_module_equals_dpo_loss(loss_type, smoothing, pairs, policy):
    rows, pad = pairs
    cfg = TrainConfig(objective="dpo", beta=0.3, dpo_loss_type=loss_type, label_smoothing=smoothing)
    objective = get_objective(cfg)
    assert objective == DPO(0.3, loss_type, smoothing)
    batch = objective.collate(rows[:4], pad)
    got, stats = LossModule(policy, NO_AUTOCAST, objective)(batch)
    logps, counts, ref = _pair_logps(policy, batch)
    (c, r), (rc, rr), (nc, nr) = logps.chunk(2), ref.chunk(2), counts.chunk(2)
    want, want_stats = dpo_loss(c, r, rc, rr, 0.3, loss_type, smoothing, chosen_tokens=nc, rejected_tokens=nr)
    assert got.requires_grad and got.item() == pytest.approx(want.item(), abs=1e-6)
    assert stats == pytest.approx({k: float(v) for k, v in want_stats.items()}, abs=1e-6)
    assert abs(want.item() - dpo_loss(c, r, rc, rr, 0.3)[0].item()) > 1e-4 or loss_type == "sigmoid"  # not sigmoid's


def test_simpo_loss_module_equals_simpo_loss(pairs, policy):
    rows, pad = pairs
    objective = get_objective(TrainConfig(objective="simpo", beta=2.0, simpo_gamma=0.8, label_smoothing=0.1))
    assert objective == SimPO(2.0, 0.8, 0.1) and not objective.uses_reference
    batch = objective.collate(rows[:4], pad)
    got, stats = LossModule(policy, NO_AUTOCAST, objective)(batch)
    logps, counts = token_logps(policy, batch, NO_AUTOCAST)
    chosen, rejected = (logps / counts).chunk(2)
    want, want_stats = simpo_loss(chosen, rejected, 2.0, 0.8, 0.1)
    assert got.requires_grad and got.item() == pytest.approx(want.item(), abs=1e-6)
    assert stats == pytest.approx({k: float(v) for k, v in want_stats.items()}, abs=1e-6)
    assert set(stats) == set(objective.stat_names)


def test_kto_loss_module_equals_kto_loss(feedback, policy):
    rows, pad = feedback
    objective = get_objective(TrainConfig(objective="kto", beta=0.3, kto_desirable_weight=1.3,
                                          kto_undesirable_weight=0.7), 128)
    assert objective == KTO(0.3, 1.3, 0.7, 128) and objective.uses_reference
    batch = objective.collate(rows[:6], pad)
    liked = batch.labels
    assert isinstance(batch, FeedbackBatch) and 0 < int(liked.sum()) < 6  # both kinds of answer
    got, stats = LossModule(policy, NO_AUTOCAST, objective)(batch)
    logps = token_logps(policy, batch, NO_AUTOCAST)[0]
    with torch.no_grad():
        kl = token_logps(policy, batch.kl, NO_AUTOCAST)[0]
        with policy.disable_adapter():
            ref, ref_kl = (token_logps(policy, b, NO_AUTOCAST)[0] for b in (batch, batch.kl))
    want, want_stats = kto_loss(logps[liked], logps[~liked], kl, ref[liked], ref[~liked], ref_kl, 0.3, 1.3, 0.7)
    assert got.requires_grad and got.item() == pytest.approx(want.item(), abs=1e-6)
    assert stats == pytest.approx({k: float(v) for k, v in want_stats.items()}, abs=1e-6)
    assert set(stats) == set(objective.stat_names) and stats["kl"] > 0  # the perturbed adapter moved the KL rows


def test_kto_evaluation_of_a_fresh_adapter(feedback, tiny_model_dir):
    """Policy = reference: z0 = 0, every answer's loss is its weight x (1 - σ(0)), every reward 0; a held-out batch
    with liked answers only (or disliked only) reports no statistics of the other kind, and the means skip it."""
    rows, pad = feedback
    liked, disliked = [r for r in rows if r.label], [r for r in rows if not r.label]
    rows = liked[:3] + [disliked[0], liked[3], disliked[1], disliked[2]]
    model = _lora(tiny_model_dir, perturb=False)
    kto = KTO(0.3, 1.3, 0.7, 128)
    batches = [rows[k: k + 3] for k in range(0, len(rows), 3)]
    assert [[r.label for r in b] for b in batches] == [[True, True, True], [False, True, False], [False]]
    got = kto.evaluate(model, rows, pad_id=pad, batch_size=3, autocast=NO_AUTOCAST)
    means = [sum(1.3 * 0.5 if r.label else 0.7 * 0.5 for r in b) / len(b) for b in batches]
    assert got["eval_loss"] == pytest.approx(sum(means) / 3, abs=1e-6)
    assert got["eval_kl"] == got["eval_rewards/chosen"] == got["eval_rewards/rejected"] == 0
    assert set(got) == {"eval_loss", *(f"eval_{k}" for k in kto.stat_names)}
    with torch.no_grad():
        per_batch = [kto.loss(model, kto.collate(b, pad), NO_AUTOCAST)[1] for b in batches]
    assert [set(st) >= {"logps/chosen", "logps/rejected"} for st in per_batch] == [False, True, False]
    assert got["eval_logps/rejected"] == pytest.approx((per_batch[1]["logps/rejected"]
                                                        + per_batch[2]["logps/rejected"]) / 2, rel=1e-6)
    assert got["eval_rewards/margins"] == per_batch[1]["rewards/margins"] == 0
    assert model.training
    simpo = evaluate(model, _rows(tiny_model_dir, PAIRS, "simpo", limit=4)[0], pad_id=pad, batch_size=2,
                     autocast=NO_AUTOCAST, objective="simpo", beta=2.0)
    assert set(simpo) == {"eval_loss", *(f"eval_{k}" for k in SimPO.stat_names)}


# ---- training -------------------------------------------------------------------------------------------------

def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective, data, beta", [("kto", FEEDBACK, 0.5), ("simpo", PAIRS, 2.0)])
def test_training_moves_the_adapter_and_widens_the_margin(objective, data, beta, tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", *data, "data.limit=16", "data.eval_ratio=0",
                         f"train.objective={objective}", f"train.beta={beta}", "train.max_steps=6", "train.lr=5e-3",
                         "samples.prompts=[]", "report_to=[]")
    result = run_training(recipe)
    rows = _metrics(result.run_dir)
    margins = [r["rewards/margins"] for r in rows if "rewards/margins" in r]
    got = losses(result.run_dir)
    assert len(got) == 6 and margins[-1] > margins[0] + 0.1 and got[-1] < got[0]
    if objective == "kto":  # step 1: policy = reference, z0 = 0: every answer's loss is 1 - σ(0)
        assert got[0] == pytest.approx(0.5, abs=1e-6) and rows[1]["kl"] == 0
        assert rows[-1]["rewards/chosen"] > 0 > rows[-1]["rewards/rejected"]
    lora_b = [t for k, t in load_file(result.run_dir / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)


# ---- train.precompute_reference -------------------------------------------------------------------------------

def test_precomputed_reference_equals_the_per_step_one(pairs, policy):
    """The table, made with epoch 0's batches, gives epoch 0's reference bit for bit, and another epoch's batching
    (other rows share a batch, other padding) the same DPO loss to 1e-5."""
    rows, pad = pairs
    plan = BatchPlan([r.length for r in rows], 3, seed=7, max_length=128)
    dpo = DPO(0.3)
    table = precompute_reference(dpo, policy, rows, plan, pad, "right", NO_AUTOCAST, torch.device("cpu"))
    assert policy.training and not table.table.isnan().any()
    first = next(iterate(rows, plan, 0, pad, "right"))
    assert torch.equal(table.attach(first, plan.batches(0)[0]).reference, dpo.reference_logps(policy, first,
                                                                                               NO_AUTOCAST))
    assert plan.batches(1) != plan.batches(0)
    for batch, ids in zip(iterate(rows, plan, 1, pad, "right"), plan.batches(1), strict=True):
        referenced = table.attach(batch, ids)
        assert isinstance(referenced, ReferencedBatch) and torch.equal(referenced.input_ids, batch.input_ids)
        with torch.no_grad():
            want, got = dpo.loss(policy, batch, NO_AUTOCAST)[0], dpo.loss(policy, referenced, NO_AUTOCAST)[0]
        assert abs(got.item() - want.item()) < 1e-5 and abs(want.item() - 0.6931) > 1e-3


DPO_RUN = (*PAIRS, "data.limit=16", "data.eval_ratio=0", "train.objective=dpo", "train.beta=0.5", "train.lr=5e-3",
           "train.max_steps=6", "train.save_steps=2", "samples.prompts=[]", "report_to=[]")  # 4 batches an epoch


def test_precompute_reference_trains_as_the_per_step_reference(tiny_model_dir, tmp_path, monkeypatch):
    per_step = run_training(tiny_recipe(tiny_model_dir, tmp_path / "per-step", *DPO_RUN))
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "table", *DPO_RUN, "train.precompute_reference=true")
    model_dir = resolve_model(recipe.model)
    tok = load_tokenizer(model_dir)
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    trainer = Trainer(recipe, start_runtime(recipe), recipe.run_dir, model_dir, tok, chat)
    trainer.setup_model()
    trainer.setup_data(prepare_data(recipe, tok, chat))
    trainer.setup_optimizer()
    trainer.setup_reference()
    recipe.run_dir.mkdir(parents=True)
    trainer.start_tracking()

    def no_reference_pass():
        raise AssertionError("a step ran the reference forward pass")

    monkeypatch.setattr(trainer.model, "disable_adapter", no_reference_pass)
    trainer.fit()  # 6 steps: 1.5 epochs
    assert losses(trainer.run_dir) == pytest.approx(losses(per_step.run_dir), abs=1e-5)
    stats = [{k: v for k, v in r.items() if k.startswith(("rewards/", "logps/"))} for r in _metrics(trainer.run_dir)]
    want = [{k: v for k, v in r.items() if k.startswith(("rewards/", "logps/"))} for r in _metrics(per_step.run_dir)]
    assert stats == [pytest.approx(w, abs=1e-5) for w in want]
    adapter = load_file(per_step.run_dir / "adapter_model.safetensors")
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), adapter[name.replace(".default", "")], atol=1e-6, rtol=0)


# ---- resume -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [(*DPO_RUN, "train.precompute_reference=true"),
                                   (*FEEDBACK, "data.limit=16", "data.eval_ratio=0", "train.objective=kto",
                                    "train.beta=0.5", "train.lr=5e-3", "train.max_steps=6", "train.save_steps=2",
                                    "samples.prompts=[]", "report_to=[]")], ids=["dpo-precomputed", "kto"])
def test_resume_equals_uninterrupted(extra, tiny_model_dir, tmp_path):
    """Keep only the step-2 checkpoint of a finished run and resume: steps 3-6 (into the second epoch) give the same
    losses, statistics and adapter; the precomputed reference is computed again at resume."""
    whole = run_training(tiny_recipe(tiny_model_dir, tmp_path / "whole", *extra))
    run = tmp_path / "resumed"
    shutil.copytree(whole.run_dir, run)
    for ckpt in (run / "checkpoints").iterdir():
        if ckpt.name != "step-0000002":
            shutil.rmtree(ckpt)
    (run / "adapter_model.safetensors").unlink()
    resumed = run_training(tiny_recipe(tiny_model_dir, run, *extra, "resume=true"))
    assert losses(resumed.run_dir) == pytest.approx(losses(whole.run_dir), rel=1e-6)
    assert _metrics(resumed.run_dir)[-1]["rewards/margins"] == pytest.approx(_metrics(whole.run_dir)[-1]
                                                                             ["rewards/margins"], rel=1e-5)
    a, b = (load_file(r.run_dir / "adapter_model.safetensors") for r in (whole, resumed))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)

"""The objective losses (train/objectives/losses.py) equal TRL 1.16's on the same batch of the tiny LLaMA: DPO's
sigmoid, ipo, robust and hinge (DPOTrainer), KTO with its KL batch (KTOTrainer), SimPO (CPOTrainer with
loss_type="simpo"); the KL batch is built as TRL builds it; and the recipe rules of these objectives fire before
any model loads."""

from __future__ import annotations

import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from medtune.data.batching import feedback_collate, mismatched, pair_collate
from medtune.data.prepare import prepare_data
from medtune.data.render import IGNORE, Sample
from medtune.errors import MedtuneError
from medtune.recipe import load_recipe
from medtune.tokenizer import prepare_tokenizer
from medtune.train.objectives.logps import token_logps
from medtune.train.objectives.losses import dpo_loss, kto_kl, kto_loss, simpo_loss

TOL = 1e-5
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
PAIRS = [{"prompt": "What is fever?", "chosen": "A raised body temperature; see a doctor if it is high.",
          "rejected": "Nothing, ignore it."},
         {"prompt": "How is asthma treated?", "chosen": "With inhalers; an attack that does not ease needs help.",
          "rejected": "It goes away."},
         {"prompt": [{"role": "user", "content": "I have a cough."}, {"role": "assistant", "content": "Since when?"},
                     {"role": "user", "content": "Three days."}],
          "chosen": [{"role": "assistant", "content": "Rest and drink water; see a doctor if it gets worse."}],
          "rejected": [{"role": "assistant", "content": "Take antibiotics."}]}]
FEEDBACK = [{"prompt": "What is fever?", "completion": "A raised body temperature; see a doctor if it is high.",
             "label": True},
            {"prompt": "My chest hurts. Is it stress?", "completion": "Surely stress, lie down.", "label": False},
            {"prompt": "How is asthma treated?", "completion": "With inhalers; an attack that does not ease needs "
             "help.", "label": True},
            {"prompt": "Can I take double the dose?", "completion": "Yes, double it.", "label": False},
            {"prompt": "What is a migraine?", "completion": "A headache, often one-sided, with nausea.",
             "label": True}]


def _prepared(model_dir, tok, tmp_path, rows, *overrides):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = load_recipe(None, [f"model={model_dir}", f"data.path={path}", "data.eval_ratio=0", "data.max_length=128",
                                *overrides])
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    return prepare_data(recipe, tok, chat).train, chat


@pytest.fixture
def pairs(tiny_model_dir, tiny_tokenizer, tmp_path):
    return _prepared(tiny_model_dir, tiny_tokenizer, tmp_path, PAIRS, "data.format=preference", "train.objective=dpo")


@pytest.fixture
def feedback(tiny_model_dir, tiny_tokenizer, tmp_path):
    return _prepared(tiny_model_dir, tiny_tokenizer, tmp_path, FEEDBACK, "data.format=feedback", "train.objective=kto")


def _perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero (policy = reference); move it so that the losses are not trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


def _completion_mask(samples: list[Sample], width: int) -> torch.Tensor:
    """TRL's completion_mask of right-padded rows: 1 on the tokens that carry loss."""
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        mask[i, : len(s.labels)] = torch.tensor([int(t != IGNORE) for t in s.labels])
    return mask


def _policy_and_reference(model, batch):
    """(summed answer log-probs, answer token counts) with the adapter, and the summed log-probs without it."""
    with torch.no_grad():
        logps, counts = token_logps(model, batch, nullcontext())
        with model.disable_adapter():
            ref = token_logps(model, batch, nullcontext())[0]
    return logps, counts, ref


def _report(name, ours, theirs):
    diff = abs(ours - theirs)
    print(f"{name}: medtune {ours:.8f} TRL {theirs:.8f} max abs diff {diff:.2e}")
    assert diff < TOL, (name, ours, theirs)


# ---- DPO loss types against DPOTrainer -----------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.2), ("hinge", 0.0)])
def test_dpo_loss_types_equal_trl(loss_type, smoothing, pairs, tiny_model_dir, tiny_tokenizer, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    data, chat = pairs
    beta = 0.3
    tiny_tokenizer.pad_token = chat.pad_token
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=loss_type,
                                        label_smoothing=smoothing, report_to=[], use_cpu=True),
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
                         processing_class=tiny_tokenizer, peft_config=LoraConfig(**LORA))
    model = _perturbed(trainer.model)
    batch = pair_collate(data, chat.pad_token_id)
    logps, counts, ref = _policy_and_reference(model, batch)
    (chosen, rejected), (ref_c, ref_r), (n_c, n_r) = logps.chunk(2), ref.chunk(2), counts.chunk(2)
    ours, stats = dpo_loss(chosen, rejected, ref_c, ref_r, beta, loss_type, smoothing, chosen_tokens=n_c,
                           rejected_tokens=n_r)
    halves = [p.chosen for p in data] + [p.rejected for p in data]
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "completion_mask": _completion_mask(halves, batch.input_ids.shape[1])}
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, False)
    _report(f"DPO {loss_type}", ours.item(), theirs.item())
    trl_stats = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert stats[k].item() == pytest.approx(trl_stats[k], abs=TOL), k


def test_dpo_loss_checks_its_arguments():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(x, x, x, x, 0.1, "ipo")
    with pytest.raises(ValueError, match="robust loss only"):
        dpo_loss(x, x, x, x, 0.1, "sigmoid", 0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(x, x, x, x, 0.1, "robust", 0.5)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(x, x, x, x, 0.1, "exo_pair")


# ---- KTO against KTOTrainer ----------------------------------------------------------------------------------------

def _kto_trainer(model_dir, tok, tmp_path, **config):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    return KTOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                      args=KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, **config),
                      train_dataset=Dataset.from_list(FEEDBACK), processing_class=tok, peft_config=LoraConfig(**LORA))


def _raise_log_probs(model, batch, lr=0.5):
    """One gradient step on the LoRA weights that raises the policy's log-probs of `batch`'s answers."""
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    grads = torch.autograd.grad(token_logps(model, batch, nullcontext())[0].mean(), params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=lr)


@pytest.mark.parametrize("kl_positive", [False, True], ids=["kl-clamped", "kl-positive"])
def test_kto_loss_equals_trl(kl_positive, feedback, tiny_model_dir, tiny_tokenizer, tmp_path):
    data, chat = feedback
    beta, desirable, undesirable = 0.5, 1.3, 0.7
    tiny_tokenizer.pad_token = chat.pad_token
    trainer = _kto_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, beta=beta, desirable_weight=desirable,
                           undesirable_weight=undesirable, per_device_train_batch_size=len(data))
    model = _perturbed(trainer.model)
    fb = feedback_collate(data, chat.pad_token_id)
    if kl_positive:  # the policy now likes the mismatched answers more than the reference does: z0 > 0
        _raise_log_probs(model, fb.kl)
    logps, _, ref = _policy_and_reference(model, fb)
    kl_logps, _, ref_kl = _policy_and_reference(model, fb.kl)
    up = fb.labels
    ours, stats = kto_loss(logps[up], logps[~up], kl_logps, ref[up], ref[~up], ref_kl, beta, desirable, undesirable)
    kl_rows = mismatched([f.sample for f in data])
    inputs = {"input_ids": fb.input_ids, "attention_mask": fb.attention_mask,
              "completion_mask": _completion_mask([f.sample for f in data], fb.input_ids.shape[1]),
              "KL_input_ids": fb.kl.input_ids, "KL_attention_mask": fb.kl.attention_mask,
              "KL_completion_mask": _completion_mask(kl_rows, fb.kl.input_ids.shape[1]), "label": fb.labels}
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, False)
    _report(f"KTO (kl {stats['kl'].item():.5f})", ours.item(), theirs.item())
    assert (stats["kl"].item() > 0.01) == kl_positive
    trl_stats = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert stats[k].item() == pytest.approx(trl_stats[k], abs=TOL), k
    assert ours.item() != pytest.approx(0.5 * (desirable * 3 + undesirable * 2) / 5, abs=1e-3)  # not policy = ref


def test_kl_batch_is_built_as_trl_builds_it(tiny_model_dir, tiny_tokenizer, tmp_path):
    """TRL's own data preparation (KL_completion_ids) and collator, against `mismatched` on the same token ids."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    tiny_tokenizer.pad_token = "<|endoftext|>"
    trainer = _kto_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, per_device_train_batch_size=5, max_length=20)
    rows = trainer.train_dataset.to_list()
    assert [r["KL_completion_ids"] for r in rows] == [rows[i - 1]["completion_ids"] for i in range(len(rows))]
    theirs = DataCollatorForUnpairedPreference(pad_token_id=5, max_length=20)(rows)
    samples = [Sample(r["prompt_ids"] + r["completion_ids"], [IGNORE] * len(r["prompt_ids"]) + r["completion_ids"],
                      "x", i) for i, r in enumerate(rows)]
    kl = mismatched(samples, max_length=20)
    width = theirs["KL_input_ids"].shape[1]
    padded = [s.input_ids + [5] * (width - len(s.input_ids)) for s in kl]
    assert padded == theirs["KL_input_ids"].tolist()
    assert _completion_mask(kl, width).tolist() == theirs["KL_completion_mask"].tolist()
    assert len(rows) == len(FEEDBACK)
    assert any(len(r["prompt_ids"]) + len(rows[i - 1]["completion_ids"]) > 20 for i, r in enumerate(rows))  # cut


def test_kto_kl_is_detached_and_clamped_at_zero():
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    assert kto_kl(policy, torch.tensor([-1.0, -2.0])).item() == 0.0  # mean -2.5, clamped
    kl = kto_kl(policy, torch.tensor([-4.0, -5.0]))
    assert kl.item() == pytest.approx(0.5) and not kl.requires_grad
    chosen = torch.tensor([-2.0], requires_grad=True)
    loss, stats = kto_loss(chosen, torch.zeros(0), policy, torch.tensor([-2.5]), torch.zeros(0),
                           torch.tensor([-4.0, -5.0]), beta=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(1 - torch.sigmoid(torch.tensor(0.5 - 0.5)).item())
    assert policy.grad is None and chosen.grad is not None  # no gradient through the reference point
    assert set(stats) == {"kl", "rewards/chosen", "logps/chosen"}  # no undesirable answer: no rejected statistics


# ---- SimPO against CPOTrainer(loss_type="simpo") -------------------------------------------------------------------

def _cpo_trainer(model_dir, tok, tmp_path, **config):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                      args=CPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, loss_type="simpo",
                                     **config),
                      train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
                      processing_class=tok)


@pytest.mark.parametrize("cpo_alpha, smoothing", [(0.0, 0.0), (0.5, 0.1)])
def test_simpo_loss_equals_trl(cpo_alpha, smoothing, pairs, tiny_model_dir, tiny_tokenizer, tmp_path):
    data, chat = pairs
    beta, gamma = 2.0, 0.7
    tiny_tokenizer.pad_token = chat.pad_token
    trainer = _cpo_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, beta=beta, simpo_gamma=gamma,
                           cpo_alpha=cpo_alpha, label_smoothing=smoothing)
    model = trainer.model.eval()
    batch = pair_collate(data, chat.pad_token_id)
    with torch.no_grad():
        logps, counts = token_logps(model, batch, nullcontext())
    (chosen, rejected), (n_c, n_r) = logps.chunk(2), counts.chunk(2)
    nll = -chosen.sum() / n_c.sum()  # mean NLL over the chosen answers' tokens
    ours, stats = simpo_loss(chosen / n_c, rejected / n_r, beta, gamma, smoothing, nll=nll, cpo_alpha=cpo_alpha)
    n = len(data)
    labels = torch.full_like(batch.input_ids, IGNORE)
    for i, s in enumerate([p.chosen for p in data] + [p.rejected for p in data]):
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
    inputs = {"chosen_input_ids": batch.input_ids[:n], "chosen_attention_mask": batch.attention_mask[:n],
              "chosen_labels": labels[:n], "rejected_input_ids": batch.input_ids[n:],
              "rejected_attention_mask": batch.attention_mask[n:], "rejected_labels": labels[n:]}
    with torch.no_grad():
        theirs, metrics = trainer.get_batch_loss_metrics(model, inputs)
    _report(f"SimPO cpo_alpha={cpo_alpha} label_smoothing={smoothing}", ours.item(), theirs.item())
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert stats[k].item() == pytest.approx(metrics[k], abs=TOL), k
    if cpo_alpha:
        assert stats["nll_loss"].item() == pytest.approx(metrics["nll_loss"], abs=TOL)


def test_simpo_loss_equals_trls_cpo_loss_on_random_log_probs():
    from trl.experimental.cpo import CPOTrainer

    gen = torch.Generator().manual_seed(3)
    chosen, rejected = -torch.rand(64, generator=gen) * 3, -torch.rand(64, generator=gen) * 3  # average log-probs
    for beta, gamma, smoothing in ((2.0, 0.5, 0.0), (0.1, 1.0, 0.2), (10.0, 3.0, 0.05)):
        stub = SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=smoothing, loss_type="simpo", alpha=0.0,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, chosen, rejected)
        ours, stats = simpo_loss(chosen, rejected, beta, gamma, smoothing)
        _report(f"SimPO pure beta={beta} gamma={gamma}", ours.item(), losses.mean().item())
        assert stats["rewards/margins"].item() == pytest.approx((chosen_rewards - rejected_rewards).mean().item())
    with pytest.raises(ValueError, match="needs nll"):
        simpo_loss(chosen, rejected, 2.0, cpo_alpha=1.0)


# ---- the recipe rules of these objectives --------------------------------------------------------------------------

def _error(*overrides) -> str:
    with pytest.raises(MedtuneError) as err:
        load_recipe(None, list(overrides))
    return str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["train.objective=kto"], "field 'train.objective': train.objective=kto needs data.format=feedback"),
    (["train.objective=simpo", "data.format=feedback"], "train.objective=simpo needs data.format=preference"),
    (["data.format=feedback"], "data.format=feedback needs train.objective kto"),
    (["data.format=preference"], "data.format=preference needs train.objective dpo or orpo or simpo"),
    (["data.format=preference", "train.objective=orpo", "train.dpo_loss_type=ipo"],
     "field 'train.dpo_loss_type': train.dpo_loss_type is read only by train.objective dpo"),
    (["data.format=preference", "train.objective=dpo", "train.kto_desirable_weight=2"],
     "field 'train.kto_desirable_weight'"),
    (["data.format=preference", "train.objective=dpo", "train.simpo_gamma=1"], "field 'train.simpo_gamma'"),
    (["data.format=feedback", "train.objective=kto", "train.precompute_reference=true"],
     "field 'train.precompute_reference'"),
    (["data.format=preference", "train.objective=dpo", "train.label_smoothing=0.1"],
     "field 'train.label_smoothing': train.label_smoothing is read only by train.objective simpo, or dpo with "
     "train.dpo_loss_type=robust"),
    (["data.format=feedback", "train.objective=kto", "train.batch_size=1"], "field 'train.batch_size'"),
    (["data.format=feedback", "train.objective=kto", "data.train_on_prompt=true"], "field 'data.train_on_prompt'"),
    (["data.format=feedback", "train.objective=kto", "eval.after_train=[perplexity]"], "not feedback rows"),
    (["train.label_smoothing=0.5"], "field 'train.label_smoothing'"),
])
def test_objective_rules_fail_when_the_recipe_loads(overrides, message):
    assert message in _error(*overrides)


def test_objective_rules_name_the_recipe_file(tmp_path):
    path = tmp_path / "kto.yaml"
    path.write_text("data:\n  format: feedback\ntrain:\n  objective: dpo\n", encoding="utf-8")
    with pytest.raises(MedtuneError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}, field 'train.objective': train.objective=dpo needs data.format=")


@pytest.mark.parametrize("overrides", [
    ["data.format=feedback", "train.objective=kto", "train.kto_undesirable_weight=1.5", "train.beta=0.2"],
    ["data.format=preference", "train.objective=dpo", "train.dpo_loss_type=robust", "train.label_smoothing=0.1",
     "train.precompute_reference=true"],
    ["data.format=preference", "train.objective=simpo", "train.simpo_gamma=1.2", "train.label_smoothing=0.1"],
])
def test_objective_settings_that_fit_load(overrides):
    recipe = load_recipe(None, overrides)
    assert recipe.train.objective == overrides[1].split("=")[1]

"""Objectives as components: the registry, what each tells the trainer, and held-out evaluation of pairs."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from medtune.data.batching import pad_collate, pair_collate
from medtune.data.prepare import prepare_data
from medtune.errors import MedtuneError
from medtune.models import add_lora, load_base_model, load_tokenizer
from medtune.recipe import LoraConfig, load_recipe
from medtune.tokenizer import prepare_tokenizer
from medtune.train.objectives import OBJECTIVES, LossModule, evaluate, get_objective
from medtune.train.objectives.dpo import DPO
from medtune.train.objectives.orpo import ORPO
from medtune.train.objectives.sft import SFT, loss_sum


def test_registry_and_what_each_objective_declares():
    assert set(OBJECTIVES) == {"sft", "dpo", "orpo"}
    sft, dpo, orpo = (get_objective(n, 0.3) for n in ("sft", "dpo", "orpo"))
    assert isinstance(sft, SFT) and isinstance(dpo, DPO) and isinstance(orpo, ORPO)
    assert (dpo.beta, orpo.beta) == (0.3, 0.3) and all(o.name == n for o, n in ((sft, "sft"), (dpo, "dpo"), (orpo, "orpo")))
    assert [o.packable for o in (sft, dpo, orpo)] == [True, False, False]
    assert [o.uses_reference for o in (sft, dpo, orpo)] == [False, True, False]
    assert [o.perplexity for o in (sft, dpo, orpo)] == [True, False, False]
    with pytest.raises(MedtuneError, match="unknown train.objective 'kto'") as err:
        get_objective("kto")
    assert err.value.field == "train.objective"


@pytest.fixture(scope="module")
def preference_data(tiny_model_dir):
    recipe = load_recipe(None, [f"model={tiny_model_dir}", "data.path=demo:preferences", "data.format=preference",
                                "data.limit=6", "data.eval_ratio=0", "data.max_length=128", "train.objective=dpo"])
    tok = load_tokenizer(str(tiny_model_dir))
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    return prepare_data(recipe, tok, chat).train, chat.pad_token_id


@pytest.fixture(scope="module")
def fresh_lora(tiny_model_dir):
    """The tiny LLaMA with a new LoRA adapter: B = 0, so the policy equals the reference."""
    model = load_base_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    return add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))


def test_pairs_are_sized_collated_and_counted_as_pairs(preference_data):
    pairs, pad = preference_data
    dpo = DPO()
    assert [dpo.row_length(p) for p in pairs] == [p.length for p in pairs]
    batch = dpo.collate(pairs[:2], pad)
    assert batch.input_ids.shape[0] == 4 and dpo.loss_count(batch) == 1  # chosen 0-1, rejected 2-3; a batch mean
    assert torch.equal(batch.input_ids, pair_collate(pairs[:2], pad).input_ids)
    sft = SFT()
    single = sft.collate([p.chosen for p in pairs[:3]], pad)
    assert sft.loss_count(single) == sum(p.chosen.num_loss_tokens for p in pairs[:3]) == single.num_loss_tokens
    assert torch.equal(single.input_ids, pad_collate([p.chosen for p in pairs[:3]], pad).input_ids)


def test_dpo_evaluation_of_a_fresh_adapter_is_log_2(preference_data, fresh_lora):
    """Policy = reference: every pair's DPO loss is -log σ(0) = log 2, every reward 0, whatever the batching."""
    pairs, pad = preference_data
    got = evaluate(fresh_lora, pairs, pad_id=pad, batch_size=4, autocast=nullcontext(), objective="dpo", beta=0.5)
    assert got["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert got["eval_rewards/chosen"] == got["eval_rewards/margins"] == 0
    assert {"eval_logps/chosen", "eval_logps/rejected", "eval_rewards/accuracies"} <= set(got)
    assert fresh_lora.training and evaluate(fresh_lora, [], pad_id=pad, batch_size=4, autocast=nullcontext()) == {}


def test_loss_module_runs_the_objective(preference_data, fresh_lora):
    pairs, pad = preference_data
    batch = pad_collate([p.chosen for p in pairs[:3]], pad)
    loss, stats = LossModule(fresh_lora, nullcontext(), SFT())(batch)
    assert stats == {} and torch.equal(loss, loss_sum(fresh_lora, batch, nullcontext()))
    orpo_loss, orpo_stats = LossModule(fresh_lora, nullcontext(), ORPO(0.25))(pair_collate(pairs[:2], pad))
    assert orpo_stats["nll_loss"] - 0.25 * orpo_stats["log_odds_ratio"] == pytest.approx(orpo_loss.item(), rel=1e-6)

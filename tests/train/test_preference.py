"""DPO and ORPO: medtune's losses equal TRL's on the same batch, only answer tokens count, and DPO training on the
tiny LLaMA moves the reward margin up."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_recipe

from medtune.data.batching import pair_collate
from medtune.data.prepare import prepare_data
from medtune.data.render import IGNORE
from medtune.recipe import load_recipe
from medtune.tokenizer import prepare_tokenizer
from medtune.train.job import run_training
from medtune.train.objectives.dpo import DPO
from medtune.train.objectives.logps import token_logps
from medtune.train.objectives.orpo import ORPO

ROWS = [{"prompt": "What is fever?", "chosen": "A raised body temperature; see a doctor if it is high.",
         "rejected": "Nothing, ignore it."},
        {"prompt": [{"role": "user", "content": "I have a cough."}, {"role": "assistant", "content": "Since when?"},
                    {"role": "user", "content": "Three days."}],
         "chosen": [{"role": "assistant", "content": "Rest and drink water; see a doctor if it gets worse."}],
         "rejected": [{"role": "assistant", "content": "Take antibiotics."}]}]


def _recipe(model_dir, path, *extra):
    return load_recipe(None, [f"model={model_dir}", f"data.path={path}", "data.format=preference", "data.eval_ratio=0",
                              "data.max_length=128", "train.objective=dpo", *extra])


@pytest.fixture
def pairs(tiny_model_dir, tiny_tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    recipe = _recipe(tiny_model_dir, path)
    chat = prepare_tokenizer(tiny_tokenizer, recipe.tokenizer)
    return prepare_data(recipe, tiny_tokenizer, chat).train, chat


def test_only_the_final_answer_carries_loss(pairs, tiny_tokenizer):
    data, _ = pairs
    for pair, row in zip(data, ROWS, strict=True):
        for sample, name in ((pair.chosen, "chosen"), (pair.rejected, "rejected")):
            answer = row[name] if isinstance(row[name], str) else row[name][0]["content"]
            learned = tiny_tokenizer.decode([t for t in sample.labels if t != IGNORE])
            assert learned.replace(" ", "") == (answer + "<|im_end|>").replace(" ", "")
    # the earlier assistant turn of the multi-turn prompt is context, not learned
    assert "Since when" in tiny_tokenizer.decode(data[1].chosen.input_ids)


def test_token_logps_count_answer_tokens_only(pairs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data, chat = pairs
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = pair_collate(data, chat.pad_token_id)
    logps, counts = token_logps(model, batch, nullcontext())
    for i, sample in enumerate([p.chosen for p in data] + [p.rejected for p in data]):
        ids = torch.tensor([sample.input_ids])
        with torch.no_grad():
            lp = model(ids).logits[0].float().log_softmax(-1)  # (T, V), alone: no padding
        want = sum(lp[t - 1, sample.labels[t]].item() for t in range(1, len(ids[0])) if sample.labels[t] != IGNORE)
        assert counts[i].item() == sample.num_loss_tokens
        assert logps[i].item() == pytest.approx(want, abs=1e-4)


LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def _perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero (policy = reference); move it so the loss is not log 2
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


def _peft_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    return _perturbed(get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                     LoraConfig(**LORA)))


def test_dpo_loss_equals_trl(pairs, tiny_model_dir, tiny_tokenizer, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    data, chat = pairs
    batch = pair_collate(data, chat.pad_token_id)
    beta = 0.3
    # TRL adds the adapter itself (peft_config), so its reference is the adapter switched off, as in medtune
    tiny_tokenizer.pad_token = chat.pad_token
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to=[], use_cpu=True),
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
                         processing_class=tiny_tokenizer, peft_config=LoraConfig(**LORA))
    model = _perturbed(trainer.model)
    ours, stats = DPO(beta).loss(model, batch, nullcontext())
    halves = [p.chosen for p in data] + [p.rejected for p in data]
    completion = torch.zeros_like(batch.input_ids)
    for i, s in enumerate(halves):
        completion[i, : len(s.labels)] = torch.tensor([int(t != IGNORE) for t in s.labels])
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "completion_mask": completion}
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, False)
    diff = abs(ours.item() - theirs.item())
    print(f"DPO loss medtune {ours.item():.8f} TRL {theirs.item():.8f} max abs diff {diff:.2e}")
    assert diff < 1e-5 and abs(ours.item() - math.log(2)) > 1e-3
    trl_stats = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # the model is in eval mode
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert stats[k] == pytest.approx(trl_stats[k], abs=1e-5), k


def test_orpo_loss_equals_trl(pairs, tiny_model_dir):
    from trl.experimental.orpo import ORPOTrainer

    data, chat = pairs
    model = _peft_model(tiny_model_dir)
    batch = pair_collate(data, chat.pad_token_id)
    lam = 0.25
    ours, stats = ORPO(lam).loss(model, batch, nullcontext())

    # TRL's own functions on the same logits: mean answer log-probs (get_batch_logps) and the odds-ratio term.
    halves = [p.chosen for p in data] + [p.rejected for p in data]
    labels = torch.full_like(batch.input_ids, IGNORE)
    for i, s in enumerate(halves):
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    n = len(data)
    fake = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(fake, logps[:n], logps[n:])
    # NLL of the chosen answers' tokens (medtune learns answers only; TRL's NLL also spans the prompt)
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].flatten(0, 1), labels[:n, 1:].flatten(), ignore_index=IGNORE)
    theirs = nll - losses.mean()
    diff = abs(ours.item() - theirs.item())
    print(f"ORPO loss medtune {ours.item():.8f} TRL {theirs.item():.8f} max abs diff {diff:.2e}")
    assert diff < 1e-5
    assert stats["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=1e-5)
    assert stats["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=1e-5)


def test_dpo_training_raises_the_margin(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", "data.path=demo:preferences", "data.format=preference",
                         "data.limit=16", "data.eval_ratio=0", "train.objective=dpo", "train.beta=0.5",
                         "train.max_steps=6", "train.lr=5e-3", "train.packing=true", "samples.prompts=[]",
                         "eval.after_train=[]", "report_to=[]")
    result = run_training(recipe)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    margins = [r["rewards/margins"] for r in rows if "rewards/margins" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(margins) == 6 and losses[0] == pytest.approx(math.log(2), abs=1e-4)  # step 1: policy = reference
    assert margins[-1] > margins[0] and losses[-1] < losses[0]
    lora_b = [t for k, t in load_file(result.run_dir / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)


def test_objective_and_format_must_agree(tiny_model_dir):
    from medtune.errors import MedtuneError

    with pytest.raises(MedtuneError, match="data.format=preference"):  # at load_recipe, before any data is read
        load_recipe(None, [f"model={tiny_model_dir}", "data.path=demo:qa", "data.format=qa", "train.objective=dpo"])


def test_bad_preference_row_names_row_and_field(tiny_model_dir, tiny_tokenizer, tmp_path):
    from medtune.errors import MedtuneError

    path = tmp_path / "bad.jsonl"
    rows = [{"question": "q", "good": "a", "rejected": "b"}, {"question": "q", "good": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = _recipe(tiny_model_dir, path, "data.columns={prompt: question, chosen: good}")
    with pytest.raises(MedtuneError) as err:
        prepare_data(recipe, tiny_tokenizer, prepare_tokenizer(tiny_tokenizer, recipe.tokenizer))
    assert "row 2" in str(err.value) and "'rejected'" in str(err.value) and "missing column" in str(err.value)

"""The training recipe, owned end to end: setup → measure the base → train → save → report.

We own the loop instead of wrapping TRL's SFTTrainer so that the step is one function we can make fast
(issue "performance"): the loss is computed only at positions that carry a target (`logits_to_keep`), in
fp32, summed over the whole accumulation window and divided once by its number of loss tokens, so
gradient accumulation gives the same update as one big batch.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from medtune.data.batching import Batch, BatchPlan, iterate, pad_collate
from medtune.data.prepare import PreparedData, prepare_data
from medtune.data.render import IGNORE, Sample
from medtune.errors import MedtuneError
from medtune.generate import RUN_META, Loaded, generate, user_turn
from medtune.models import (
    add_lora,
    bf16_supported,
    load_base_model,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from medtune.recipe import Recipe
from medtune.tokenizer import ChatSetup, prepare_tokenizer
from medtune.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from medtune.train.loss import chunked_cross_entropy_sum
from medtune.train.rundir import CardInfo, RunDir

log = logging.getLogger("medtune")


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]
    samples: list[dict]


class Interrupted(Exception):
    """SIGINT/SIGTERM during training: checkpoint, then exit with 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def loss_sum(model, batch: Batch, autocast, chunked: bool = True) -> torch.Tensor:
    """Sum of token cross-entropies over the batch's targets, in fp32.

    Only positions with a target reach the output layer. With a frozen output layer (always, with LoRA) the
    loss goes through `chunked_cross_entropy_sum`, which never holds more than one chunk of logits; otherwise
    through transformers' `logits_to_keep`, which computes logits only at those positions."""
    keep = (batch.targets != IGNORE).any(0).nonzero().squeeze(-1)  # (K,)
    targets = batch.targets[:, keep]  # (B, K)
    head = model.get_output_embeddings()
    if chunked and isinstance(head, torch.nn.Linear) and not head.weight.requires_grad and head.bias is None:
        with autocast:
            hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         position_ids=batch.position_ids, use_cache=False).last_hidden_state  # (B, T, H)
            valid = targets != IGNORE  # (B, K)
            return chunked_cross_entropy_sum(hidden[:, keep][valid], head.weight, targets[valid])
    with autocast:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                       logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def evaluate(model, samples: list[Sample], *, pad_id: int, batch_size: int, device, autocast) -> dict[str, float]:
    """Held-out loss and perplexity, token-weighted over the tokens that carry loss."""
    if not samples:
        return {}
    was_training = model.training
    model.eval()
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    total, tokens = 0.0, 0
    for k in range(0, len(order), batch_size):
        batch = pad_collate([samples[i] for i in order[k: k + batch_size]], pad_id).to(device)
        total += loss_sum(model, batch, autocast).item()
        tokens += batch.num_loss_tokens
    model.train(was_training)
    loss = total / tokens
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


def _micro_batches(data: PreparedData, plan: BatchPlan, pad_id: int, side: str, start: int) -> Iterator[Batch]:
    """Endless micro-batches across epochs, starting after `start` already-consumed ones (resume)."""
    per_epoch = len(plan)
    epoch, skip = divmod(start, per_epoch)
    while True:
        yield from iterate(data.train, plan, epoch, pad_id, side, skip=skip)
        epoch, skip = epoch + 1, 0


def _pick_run_dir(recipe: Recipe) -> Path:
    """runs/<name>, or runs/<name>-2, -3 … so an earlier run is never overwritten."""
    run_dir = recipe.run_dir
    if recipe.resume or not run_dir.exists() or not any(run_dir.iterdir()):
        return run_dir
    if recipe.output_dir:
        raise MedtuneError("output_dir already holds a run; pass resume=true to continue it or choose another "
                           "output_dir", file=str(run_dir), field="output_dir")
    n = 2
    while (candidate := run_dir.with_name(f"{run_dir.name}-{n}")).exists():
        n += 1
    log.info("%s exists; writing this run to %s", run_dir, candidate)
    return candidate


def _save_run_files(run_dir: Path, recipe: Recipe, tok, chat: ChatSetup, model_dir: str) -> None:
    """Everything later commands need to reload the run exactly as trained."""
    from transformers import GenerationConfig

    tok.save_pretrained(run_dir)
    GenerationConfig(eos_token_id=chat.stop_token_ids, pad_token_id=chat.pad_token_id,
                     bos_token_id=tok.bos_token_id, max_new_tokens=256).save_pretrained(run_dir)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    meta = {"base_model": recipe.model, "base_model_path": str(Path(model_dir).resolve()), "template": chat.template,
            "stop_tokens": chat.stop_tokens, "stop_token_ids": chat.stop_token_ids, "pad_token": chat.pad_token,
            "pad_token_id": chat.pad_token_id, "quant": recipe.quant.model_dump(), "max_length": recipe.data.max_length,
            "trust_remote_code": recipe.trust_remote_code}
    (run_dir / RUN_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def run_training(recipe: Recipe) -> TrainResult:
    # ---- setup -------------------------------------------------------------------------------------------
    random.seed(recipe.train.seed)
    torch.manual_seed(recipe.train.seed)
    device = pick_device(recipe.train.device)
    bf16 = recipe.train.precision == "bf16" or (recipe.train.precision == "auto" and bf16_supported(device))
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    quantized = recipe.quant.load_in_4bit

    model_dir = resolve_model(recipe.model)
    tok = load_tokenizer(model_dir, recipe.trust_remote_code)
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    data = prepare_data(recipe, tok, chat)
    for line in data.report.lines():
        log.info(line)

    run_dir = _pick_run_dir(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "data_report.json").write_text(json.dumps(data.report.to_dict(), indent=2), encoding="utf-8")

    # Frozen base weights are stored in the compute dtype (bf16 where fast) so autocast never re-casts them.
    model = load_base_model(model_dir, dtype=dtype, device=device, quant=recipe.quant,
                            trust_remote_code=recipe.trust_remote_code, attn_implementation=recipe.attn_implementation)
    if chat.added_tokens:
        model.resize_token_embeddings(len(tok))
    model = add_lora(model, recipe.lora, gradient_checkpointing=recipe.train.gradient_checkpointing, quantized=quantized,
                     autocast=bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    log.info("model %s: %s trainable LoRA parameters (%s), base in %s, %s", recipe.model, f"{n_train:,}",
             "QLoRA " + recipe.quant.quant_type if quantized else "LoRA", "4 bits" if quantized else dtype, device)

    cfg = recipe.train
    if cfg.early_stopping_patience and not (cfg.eval_steps and data.eval):
        raise MedtuneError("train.early_stopping_patience needs train.eval_steps > 0 and held-out data",
                           field="train.early_stopping_patience")
    plan = BatchPlan([len(s.input_ids) for s in data.train], cfg.batch_size, cfg.seed, packing=cfg.packing,
                     group_by_length=cfg.group_by_length, max_length=recipe.data.max_length)
    steps_per_epoch = math.ceil(len(plan) / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optimizer = _optimizer(cfg, params)
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    state = TrainState(step=0, base_eval={})
    if recipe.resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise MedtuneError("resume=true but the run has no checkpoint yet", file=str(run_dir), field="resume")
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        log.info("resuming from %s (step %d of %d)", ckpt, state.step, total_steps)

    tracker = RunDir(run_dir, run_name=run_dir.name, config=recipe.to_dict(), report_to=recipe.report_to,
                     wandb_project=recipe.wandb_project, resume=recipe.resume)
    evaluate_kw = dict(pad_id=chat.pad_token_id, batch_size=cfg.batch_size, device=device, autocast=autocast)
    if cfg.eval_before and data.eval and not state.base_eval:
        base = evaluate(model, data.eval, **evaluate_kw)
        state.base_eval = {f"base_{k}": v for k, v in base.items()}
        log.info("base model on held-out data: loss %.4f, perplexity %.2f", base["eval_loss"], base["eval_ppl"])
        tracker.log({"eval_loss": base["eval_loss"], "eval_ppl": base["eval_ppl"]}, step=0)

    # ---- train ---------------------------------------------------------------------------------------------
    _save_run_files(run_dir, recipe, tok, chat, model_dir)
    model.train()
    batches = _micro_batches(data, plan, chat.pad_token_id, recipe.tokenizer.padding_side, state.step * cfg.grad_accum)
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    window_loss, window_tokens, window_real, window_start = 0.0, 0, 0, time.perf_counter()
    run_real, run_start = 0, time.perf_counter()
    last_logged: dict[str, float] = {}
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    stopper = EarlyStopping(cfg.early_stopping_patience)
    try:
        while state.step < total_steps:
            micro = [next(batches).to(device) for _ in range(cfg.grad_accum)]
            n_loss = sum(b.num_loss_tokens for b in micro)
            step_loss = 0.0
            for b in micro:
                loss = loss_sum(model, b, autocast)
                (loss / n_loss).backward()
                step_loss += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            real = sum(b.num_tokens for b in micro)
            window_loss, window_tokens, window_real, run_real = window_loss + step_loss, window_tokens + n_loss, \
                window_real + real, run_real + real
            bar.update(1)
            if state.step % cfg.logging_steps == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - window_start
                last_logged = {"loss": window_loss / window_tokens, "learning_rate": scheduler.get_last_lr()[0],
                               "grad_norm": float(grad_norm), "tokens_per_s": window_real / elapsed,
                               "tokens_seen": run_real, "epoch": state.step / steps_per_epoch}
                tracker.log(last_logged, step=state.step)
                bar.set_postfix(loss=f"{last_logged['loss']:.4f}", tok_s=f"{last_logged['tokens_per_s']:.0f}")
                window_loss, window_tokens, window_real, window_start = 0.0, 0, 0, time.perf_counter()
            if cfg.eval_steps and state.step % cfg.eval_steps == 0 and state.step < total_steps and data.eval:
                result = evaluate(model, data.eval, **evaluate_kw)
                tracker.log(result, step=state.step)
                if stopper.should_stop(result["eval_loss"]):
                    log.info("early stop at step %d: held-out loss has not improved for %d evaluations (best %.4f)",
                             state.step, stopper.patience, stopper.best)
                    break
            if cfg.save_steps and state.step % cfg.save_steps == 0 and state.step < total_steps:
                save_checkpoint(run_dir, model, optimizer, scheduler, state)
    except Interrupted as stop:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        path = save_checkpoint(run_dir, model, optimizer, scheduler, state)
        tracker.close()
        code = 128 + stop.signum
        print(f"\ninterrupted at step {state.step}/{total_steps}; checkpoint {path}\n"
              f"resume with: medtune train <recipe> output_dir={run_dir} resume=true", flush=True)
        raise SystemExit(code) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    bar.close()
    train_seconds = time.perf_counter() - run_start

    # ---- save ---------------------------------------------------------------------------------------------
    model.save_pretrained(run_dir)
    save_checkpoint(run_dir, model, optimizer, scheduler, state)

    # ---- report -------------------------------------------------------------------------------------------
    metrics: dict[str, float] = {"steps": state.step, "train_loss": last_logged.get("loss", float("nan")),
                                 "tokens_per_s": run_real / max(train_seconds, 1e-9), "train_seconds": train_seconds,
                                 **state.base_eval}
    if data.eval:
        final = evaluate(model, data.eval, **evaluate_kw)
        tracker.log(final, step=state.step)
        metrics.update(final)
    samples = _sample_answers(recipe, model, tok, chat, bf16)
    plots = tracker.plots()
    tracker.write_card(CardInfo(base_model=recipe.model, base_model_path=model_dir, recipe=recipe.to_dict(),
                                data_report_lines=data.report.lines(), metrics=metrics, samples=samples, plots=plots,
                                adapter_kind="QLoRA" if quantized else "LoRA"))
    tracker.close()
    if recipe.eval.after_train:
        from medtune.eval.suite import after_train

        after_train(recipe, run_dir, _loaded(recipe, model, tok, chat, bf16))
    (run_dir / "metrics_final.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return TrainResult(run_dir, metrics, samples)


def _loaded(recipe: Recipe, model, tok, chat: ChatSetup, bf16: bool) -> Loaded:
    """The model in training as `generate`/`medtune eval` see a loaded run."""
    return Loaded(model, tok, chat.stop_token_ids, chat.pad_token_id, recipe.model, True, recipe.data.max_length,
                  torch.bfloat16 if bf16 else None)


class EarlyStopping:
    """Counts evaluations without a new best held-out loss; `should_stop` once `patience` pass (0 = never)."""

    def __init__(self, patience: int):
        self.patience, self.best, self.stale = patience, math.inf, 0

    def should_stop(self, loss: float) -> bool:
        if loss < self.best:
            self.best, self.stale = loss, 0
        else:
            self.stale += 1
        return 0 < self.patience <= self.stale


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _optimizer(cfg, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.optimizer == "adamw_fused")


def _sample_answers(recipe: Recipe, model, tok, chat: ChatSetup, bf16: bool) -> list[dict]:
    """Greedy answers of the base (adapter off) and the tuned model to the recipe's sample prompts."""
    if not recipe.samples.prompts:
        return []
    loaded = _loaded(recipe, model, tok, chat, bf16)
    was_training = model.training
    model.eval()
    out = []
    for prompt in recipe.samples.prompts:
        messages = user_turn(prompt, recipe.tokenizer.system_prompt)
        kw = dict(max_new_tokens=recipe.samples.max_new_tokens)
        out.append({"prompt": prompt, "base": generate(loaded, messages, use_adapter=False, **kw),
                    "tuned": generate(loaded, messages, **kw)})
    model.train(was_training)
    return out

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

from medtune.data.batching import Batch, BatchPlan, iterate, pair_collate
from medtune.data.prepare import PreparedData, prepare_data
from medtune.data.render import IGNORE, Pair, Sample
from medtune.errors import MedtuneError
from medtune.eval.gate import check_gate, gate_after_train
from medtune.eval.perplexity import held_out
from medtune.generate import Loaded, generate, user_turn
from medtune.models import (
    add_lora,
    bf16_supported,
    load_base_model,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from medtune.recipe import Recipe
from medtune.run.card import write_card
from medtune.run.layout import DATA_REPORT, METRICS_FINAL, RECIPE, SAMPLES
from medtune.run.meta import RunMeta, hardware, versions
from medtune.run.metrics import RunDir, lr_point
from medtune.tokenizer import ChatSetup, prepare_tokenizer
from medtune.train.allocator import return_freed_memory_to_os
from medtune.train.checkpoint import (
    TrainState,
    check_same_adapter,
    latest_checkpoint,
    resume_checkpoint,
    save_adapter,
    save_checkpoint,
    trim_metrics,
    writing,
)
from medtune.train.distributed import Single, setup, shard
from medtune.train.guard import Interrupted, NonFinite, NonFiniteGuard, StopSignals
from medtune.train.lock import RunLock, holder, is_locked
from medtune.train.loss import chunked_cross_entropy_sum
from medtune.train.memory import check_memory, estimate_for_recipe
from medtune.train.preference import preference_loss

log = logging.getLogger("medtune")


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]
    samples: list[dict]
    main: bool = True  # False on the other processes of a distributed run (they write and report nothing)
    gate: dict | None = None  # eval.gate: the release gate's report (RUN/gate.json)


class LossModule(torch.nn.Module):
    """The model and its loss as one module: what DDP / FSDP / DeepSpeed wrap, so every training forward goes
    through the engine."""

    def __init__(self, model, autocast, objective: str = "sft", beta: float = 0.1):
        super().__init__()
        self.model = model
        self.autocast = autocast
        self.objective, self.beta = objective, beta

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """sft: (summed token loss, {}); dpo / orpo: (the batch's mean pair loss, its reward statistics)."""
        if self.objective == "sft":
            return loss_sum(self.model, batch, self.autocast), {}
        return preference_loss(self.model, batch, self.objective, self.beta, self.autocast)


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


def evaluate(model, samples: list[Sample] | list[Pair], *, pad_id: int, batch_size: int, autocast, device=None,
             objective: str = "sft", beta: float = 0.1) -> dict[str, float]:
    """Held-out loss and perplexity, token-weighted over the tokens that carry loss (eval/perplexity.py's); for
    dpo / orpo the pair loss and reward statistics, averaged over the batches."""
    if not samples:
        return {}
    if objective == "sft":
        p = held_out(model, samples, pad_id=pad_id, batch_size=batch_size, autocast=autocast)
        return {"eval_loss": p.loss, "eval_ppl": p.perplexity, "eval_tokens": p.tokens}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        device = device or next(model.parameters()).device
        batches = [pair_collate(samples[k: k + batch_size], pad_id).to(device) for k in range(0, len(samples), batch_size)]
        results = [preference_loss(model, b, objective, beta, autocast) for b in batches]
    model.train(was_training)
    out = {"eval_loss": sum(loss.item() for loss, _ in results) / len(results)}
    return out | {f"eval_{k}": sum(st[k] for _, st in results) / len(results) for k in results[0][1]}


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
    if is_locked(run_dir):
        raise MedtuneError(f"another training is using this run directory ({holder(run_dir)})", file=str(run_dir))
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


def _lock(run_dir: Path) -> RunLock:
    """Create the run directory and take its lock; a folder that cannot be written is one clear error."""
    try:
        return RunLock(run_dir).acquire()
    except OSError as e:
        raise MedtuneError(f"cannot write the run directory: {e.strerror or e}; choose a writable output_dir",
                           file=str(run_dir), field="output_dir") from None


def _save_run_files(run_dir: Path, recipe: Recipe, tok, chat: ChatSetup, model_dir: str, device=None,
                    precision: str = "fp32") -> None:
    """Everything later commands need to reload the run exactly as trained."""
    from transformers import GenerationConfig

    tok.save_pretrained(run_dir)
    GenerationConfig(eos_token_id=chat.stop_token_ids, pad_token_id=chat.pad_token_id,
                     bos_token_id=tok.bos_token_id, max_new_tokens=256).save_pretrained(run_dir)
    (run_dir / RECIPE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    RunMeta(base_model=recipe.model, base_model_path=str(Path(model_dir).resolve()), template=chat.template,
            stop_tokens=chat.stop_tokens, stop_token_ids=chat.stop_token_ids, pad_token=chat.pad_token,
            pad_token_id=chat.pad_token_id, max_length=recipe.data.max_length, quant=recipe.quant.model_dump(),
            trust_remote_code=recipe.trust_remote_code, versions=versions(),
            hardware=hardware(device or torch.device("cpu"), precision)).write(run_dir)


def run_training(recipe: Recipe, force: bool = False) -> TrainResult:
    """Train one recipe. `force`: start even when the memory estimate says it will not fit.
    Under torchrun / accelerate launch every process calls this; only rank 0 writes and reports."""
    # ---- setup -------------------------------------------------------------------------------------------
    random.seed(recipe.train.seed)
    torch.manual_seed(recipe.train.seed)
    cfg = recipe.train
    dist = setup(cfg.device, cfg.grad_accum, cfg.batch_size)
    if not dist.is_main:
        log.setLevel(logging.WARNING)
    device = pick_device(cfg.device) if isinstance(dist, Single) else dist.device
    if device.type == "cpu" and cfg.release_memory:
        return_freed_memory_to_os()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_supported(device))
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    if recipe.resume and dist.sharded:
        raise MedtuneError("resume=true is not supported under FSDP / DeepSpeed (sharded optimizer state); "
                           "resume with DDP or one process", field="resume")

    model_dir = resolve_model(recipe.model)
    tok = load_tokenizer(model_dir, recipe.trust_remote_code)
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    data = prepare_data(recipe, tok, chat)
    for line in data.report.lines():
        log.info(line)
    if recipe.eval.gate:  # a mistake in the gate's config stops us before the model loads
        check_gate(recipe.gate, held_out=bool(data.eval))

    log.info(check_memory(estimate_for_recipe(recipe, model_dir, device, bf16), device, force))

    run_dir = dist.broadcast(_pick_run_dir(recipe) if dist.is_main else None)
    lock = _lock(run_dir) if dist.is_main else None
    try:
        if dist.is_main:
            with writing(run_dir, "the run directory"):
                (run_dir / DATA_REPORT).write_text(json.dumps(data.report.to_dict(), indent=2), encoding="utf-8")
        return _train(recipe, dist, run_dir, model_dir, tok, chat, data, device, dtype, bf16, autocast)
    finally:
        if lock is not None:
            lock.release()


def _train(recipe: Recipe, dist, run_dir: Path, model_dir: str, tok, chat: ChatSetup, data: PreparedData, device,
           dtype, bf16: bool, autocast) -> TrainResult:
    quantized = recipe.quant.load_in_4bit
    # Frozen base weights are stored in the compute dtype (bf16 where fast) so autocast never re-casts them.
    model = load_base_model(model_dir, dtype=dtype, device=device, quant=recipe.quant,
                            trust_remote_code=recipe.trust_remote_code, attn_implementation=recipe.attn_implementation)
    if chat.added_tokens:
        model.resize_token_embeddings(len(tok))
    model = add_lora(model, recipe.lora, gradient_checkpointing=recipe.train.gradient_checkpointing, quantized=quantized,
                     autocast=bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    log.info("model %s: %s trainable LoRA parameters (%s), base in %s, %s%s", recipe.model, f"{n_train:,}",
             "QLoRA " + recipe.quant.quant_type if quantized else "LoRA", "4 bits" if quantized else dtype, device,
             f", {dist.world} processes" if dist.world > 1 else "")

    cfg = recipe.train
    if cfg.early_stopping_patience and not (cfg.eval_steps and data.eval):
        raise MedtuneError("train.early_stopping_patience needs train.eval_steps > 0 and held-out data",
                           field="train.early_stopping_patience")
    pairs = cfg.objective != "sft"  # dpo / orpo: batch_size pairs per micro-batch, never packed
    if pairs and cfg.packing:
        log.info("train.packing is off for train.objective=%s: a pair's chosen and rejected answers share a batch",
                 cfg.objective)
    if recipe.samples.from_eval and recipe.data.format == "text":
        raise MedtuneError("samples.from_eval needs prompts: a chat data format, not data.format=text",
                           field="samples.from_eval")
    plan = BatchPlan([s.length if pairs else len(s.input_ids) for s in data.train], cfg.batch_size, cfg.seed,
                     packing=cfg.packing and not pairs,
                     group_by_length=cfg.group_by_length, max_length=recipe.data.max_length)
    per_step = cfg.grad_accum * dist.world  # micro-batches consumed per optimizer step, all processes
    steps_per_epoch = math.ceil(len(plan) / per_step)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optimizer = _optimizer(cfg, params)
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    state = TrainState(step=0, base_eval={})
    if recipe.resume:
        check_same_adapter(run_dir, recipe.lora.model_dump())
        ckpt, state = resume_checkpoint(run_dir, model, optimizer, scheduler)
        if dist.is_main:
            trim_metrics(run_dir, state.step)
        log.info("resuming from %s (step %d of %d)", ckpt, state.step, total_steps)

    tracker = RunDir(run_dir, run_name=run_dir.name, config=recipe.to_dict(), report_to=recipe.report_to,
                     wandb_project=recipe.wandb_project, resume=recipe.resume) if dist.is_main else _NoTracker()
    can_eval = dist.is_main and not dist.sharded  # evaluation calls the model outside a sharding engine
    evaluate_kw = dict(pad_id=chat.pad_token_id, batch_size=cfg.batch_size, device=device, autocast=autocast,
                       objective=cfg.objective, beta=cfg.beta)
    base_ppl = None  # the base model's held-out perplexity per text: eval.after_train reuses it, never recomputes
    if cfg.eval_before and data.eval and not state.base_eval and can_eval:
        if pairs:
            base = evaluate(model, data.eval, **evaluate_kw)
        else:  # one window per text (texts are at most max_length): evaluate's figures, kept per text
            from medtune.eval.perplexity import perplexity

            base_ppl = perplexity(_loaded(recipe, model, tok, chat, bf16), data.eval, batch_size=cfg.batch_size,
                                  use_adapter=False, progress=False)
            base = {"eval_loss": base_ppl.loss, "eval_ppl": base_ppl.perplexity, "eval_tokens": base_ppl.tokens}
        state.base_eval = {f"base_{k}": v for k, v in base.items()}
        log.info("base model on held-out data: loss %.4f%s", base["eval_loss"],
                 f", perplexity {base['eval_ppl']:.4g}" if "eval_ppl" in base else "")
        tracker.log({k: base[k] for k in ("eval_loss", "eval_ppl") if k in base}, step=0)

    # ---- train ---------------------------------------------------------------------------------------------
    if dist.is_main:
        with writing(run_dir, "the run directory"):
            _save_run_files(run_dir, recipe, tok, chat, model_dir, device,
                            ("bf16" if bf16 else "fp32") + (f", 4-bit {recipe.quant.quant_type} base" if quantized else ""))
    wrapped, optimizer = dist.prepare(LossModule(model, autocast, cfg.objective, cfg.beta), optimizer)
    wrapped.train()

    def checkpoint() -> Path | None:
        adapter = dist.adapter_state(wrapped)  # a collective under FSDP/ZeRO-3: every rank gathers
        if not dist.is_main:
            return None
        return save_checkpoint(run_dir, model, optimizer, scheduler, state, cfg.keep_last_n, adapter)

    batches = shard(_micro_batches(data, plan, chat.pad_token_id, recipe.tokenizer.padding_side, state.micro),
                    dist.rank, dist.world)
    guard = NonFiniteGuard(cfg.nan_policy)
    window_loss, window_tokens, window_real, window_start = 0.0, 0, 0, time.perf_counter()
    window_stats: dict[str, float] = {}  # dpo / orpo: sums of the micro-batches' reward statistics
    run_real, run_start = 0, time.perf_counter()
    last_logged: dict[str, float] = {}
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not dist.is_main)
    stopper = EarlyStopping(cfg.early_stopping_patience)
    if dist.is_main and state.step == 0:
        tracker.log(lr_point(scheduler), step=0)  # the rate of the first step: the warm-up starts here
    with StopSignals() as signals:
        try:
            while state.step < total_steps:
                micro = [next(batches).to(device) for _ in range(cfg.grad_accum)]
                # sft divides the window's summed token loss by its loss tokens; dpo / orpo average the batch means
                (n_loss,) = dist.sum([len(micro) if pairs else sum(b.num_loss_tokens for b in micro)])
                step_loss, step_stats = 0.0, {}
                for b in micro:
                    with dist.accumulate(wrapped):
                        loss, stats = wrapped(b)
                        dist.backward(loss, n_loss, cfg.grad_accum)
                    step_loss += loss.item()
                    for k, v in stats.items():
                        step_stats[k] = step_stats.get(k, 0.0) + v
                grad_norm = dist.clip_grad_norm(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                step_loss, real, stop = dist.sum([step_loss, sum(b.num_tokens for b in micro),
                                                  float(signals.signum is not None)])
                try:
                    skip = guard.bad(state.step + 1, step_loss / max(n_loss, 1), grad_norm)
                except NonFinite as e:
                    optimizer.zero_grad(set_to_none=True)
                    path = checkpoint()  # the weights before the bad step: resumable with nan_policy=skip_batch
                    e.args = (f"{e.args[0]}; checkpoint {path}",)
                    raise
                state.micro += cfg.grad_accum * dist.world
                if skip:
                    optimizer.zero_grad(set_to_none=True)
                    state.skipped.append(state.step + 1)
                    log.warning("step %d: non-finite loss or gradient, batch skipped (train.nan_policy=skip_batch)",
                                state.step + 1)
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                window_loss, window_tokens, window_real, run_real = window_loss + step_loss, window_tokens + n_loss, \
                    window_real + real, run_real + real
                window_stats = {k: window_stats.get(k, 0.0) + v for k, v in step_stats.items()}
                bar.update(1)
                if state.step % cfg.logging_steps == 0 or state.step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    last_logged = {"loss": window_loss / window_tokens, "learning_rate": scheduler.get_last_lr()[0],
                                   "grad_norm": grad_norm, "tokens_per_s": window_real / elapsed,
                                   "tokens_seen": run_real, "epoch": state.step / steps_per_epoch}
                    if window_stats:
                        names = sorted(window_stats)
                        sums = dist.sum([window_stats[k] for k in names])
                        last_logged |= {k: v / window_tokens for k, v in zip(names, sums, strict=True)}
                        window_stats = {}
                    tracker.log(last_logged, step=state.step)
                    bar.set_postfix(loss=f"{last_logged['loss']:.4f}", tok_s=f"{last_logged['tokens_per_s']:.0f}")
                    window_loss, window_tokens, window_real, window_start = 0.0, 0, 0, time.perf_counter()
                elif state.step <= warmup:  # every warm-up step, so the plot shows the ramp
                    tracker.log(lr_point(scheduler), step=state.step)
                if cfg.eval_steps and state.step % cfg.eval_steps == 0 and state.step < total_steps and data.eval \
                        and can_eval:
                    result = evaluate(model, data.eval, **evaluate_kw)
                    tracker.log(result, step=state.step)
                    if stopper.should_stop(result["eval_loss"]):
                        log.info("early stop at step %d: held-out loss has not improved for %d evaluations "
                                 "(best %.4f)", state.step, stopper.patience, stopper.best)
                        break
                if stop:  # a signal reached some process during this step: all stop after it
                    raise Interrupted(signals.signum or signal.SIGTERM, step_finished=True)
                if cfg.save_steps and state.step % cfg.save_steps == 0 and state.step < total_steps:
                    checkpoint()
        except Interrupted as halt:
            bar.close()  # before the message, not after it
            optimizer.zero_grad(set_to_none=True)
            message = f"step abandoned; last complete checkpoint {latest_checkpoint(run_dir)}"
            if halt.step_finished:
                try:
                    message = f"checkpoint {checkpoint()}"
                except Interrupted:  # a second signal while it was written: the half-written one is removed
                    message = (f"second signal: checkpoint abandoned; last complete checkpoint "
                               f"{latest_checkpoint(run_dir)}")
            signals.ignore()  # from here on a further signal must not cut the message short
            tracker.close()
            if dist.is_main:
                print(f"\ninterrupted at step {state.step}/{total_steps}; {message}\n"
                      f"resume with: medtune train <recipe> output_dir={run_dir} resume=true", flush=True)
            raise SystemExit(128 + halt.signum) from None
        finally:
            bar.close()
    train_seconds = time.perf_counter() - run_start

    # ---- save ---------------------------------------------------------------------------------------------
    adapter = dist.adapter_state(wrapped)
    if dist.is_main:
        save_adapter(run_dir, model, adapter)
        save_checkpoint(run_dir, model, optimizer, scheduler, state, cfg.keep_last_n, adapter)
    dist.barrier()
    dist.close()
    if not dist.is_main:
        return TrainResult(run_dir, {}, [], main=False)

    # ---- report -------------------------------------------------------------------------------------------
    metrics: dict[str, float] = {"steps": state.step, "train_loss": last_logged.get("loss", float("nan")),
                                 "tokens_per_s": run_real / max(train_seconds, 1e-9), "train_seconds": train_seconds,
                                 **state.base_eval}
    if state.skipped:
        metrics["skipped_batches"] = len(state.skipped)
    if can_eval:
        _announce_after_train(recipe, data)
    if data.eval and can_eval:
        log.info("held-out eval (tuned): %d rows...", len(data.eval))
        final = evaluate(model, data.eval, **evaluate_kw)
        tracker.log(final, step=state.step)
        metrics.update(final)
    samples = _sample_answers(recipe, model, tok, chat, bf16, data) if can_eval else []
    tracker.plots(metrics)
    tracker.close()
    (run_dir / METRICS_FINAL).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (run_dir / SAMPLES).write_text(json.dumps(samples, indent=2, ensure_ascii=False), encoding="utf-8")
    write_card(run_dir)
    if recipe.eval.after_train and can_eval:
        from medtune.eval.suite import after_train

        after_train(recipe, run_dir, _loaded(recipe, model, tok, chat, bf16), held_out=data.eval,
                    base_perplexity=base_ppl)
    gate = None
    if recipe.eval.gate and can_eval:
        gate = gate_after_train(recipe, run_dir, _loaded(recipe, model, tok, chat, bf16), held_out=data.eval,
                                base_perplexity=base_ppl)
    return TrainResult(run_dir, metrics, samples, gate=gate)


def _announce_after_train(recipe: Recipe, data: PreparedData) -> None:
    """One line naming the work that follows `train: 100%` (it can take minutes on a CPU) and how to skip it."""
    n_samples = len(recipe.samples.prompts) + len([p for p in data.eval_prompts[: recipe.samples.from_eval] if p])
    work = ([f"held-out eval ({len(data.eval)} rows)"] if data.eval else []) + \
        ([f"{n_samples} sample answers (base and tuned)"] if n_samples else []) + \
        ([f"eval tasks {', '.join(recipe.eval.after_train)}"] if recipe.eval.after_train else []) + \
        (["the release gate (eval.gate)"] if recipe.eval.gate else [])
    if work:
        log.info("after training: %s. Skip them with: samples.prompts=[] samples.from_eval=0 eval.after_train=[] "
                 "eval.gate=false",
                 "; ".join(work))


class _NoTracker:
    """What processes other than rank 0 log to: nothing."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


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


def _optimizer(cfg, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.optimizer == "adamw_fused")


def _sample_answers(recipe: Recipe, model, tok, chat: ChatSetup, bf16: bool, data: PreparedData) -> list[dict]:
    """Answers of the base (adapter off) and the tuned model to the recipe's sample prompts, then to the prompts of
    the first `samples.from_eval` held-out rows; greedy, with the recipe's repetition control."""
    cfg = recipe.samples
    conversations = [(user_turn(p, recipe.tokenizer.system_prompt), None) for p in cfg.prompts]
    refs = data.eval_references
    conversations += [(p, refs[i] if i < len(refs) else None) for i, p in enumerate(data.eval_prompts[: cfg.from_eval])
                      if p]  # held-out rows: never trained on; their own answer is the reference
    if not conversations:
        return []
    loaded = _loaded(recipe, model, tok, chat, bf16)
    kw = {"max_new_tokens": cfg.max_new_tokens, **{k: v for k, v in (("repetition_penalty", cfg.repetition_penalty),
                                                                     ("no_repeat_ngram_size", cfg.no_repeat_ngram_size))
                                                   if v is not None}}
    was_training = model.training
    model.eval()
    out = []
    for i, (messages, reference) in enumerate(conversations, 1):
        log.info("sample answers %d/%d (base)...", i, len(conversations))
        base = generate(loaded, messages, use_adapter=False, **kw)
        log.info("sample answers %d/%d (tuned)...", i, len(conversations))
        out.append({"prompt": messages[-1]["content"], "base": base, "tuned": generate(loaded, messages, **kw),
                    **({"reference": reference} if reference else {})})
    model.train(was_training)
    return out


"""The trainer: one recipe's model, data and optimizer, and the loop that fits them, in named phases.

    setup_model       base weights (+ QLoRA), LoRA adapter; only the adapter trains
    setup_data        the batch plan and the run's length in optimizer steps
    setup_optimizer   optimizer and schedule; on resume, their state and the data position from the checkpoint
    setup_reference   train.precompute_reference (dpo): every training pair's reference log-probs, once
    start_tracking    metrics.jsonl and the chosen trackers (rank 0)
    evaluate_base     the base model's held-out figures, before any step
    fit               the steps, with accumulation, the NaN/Inf guard, signals, periodic evaluation and checkpoints
    evaluate          held-out figures of the model as it is now
    save_checkpoint   a resumable checkpoint; `save_final` also writes the run's adapter

We own the loop instead of wrapping TRL's SFTTrainer so that the step is one function we can make fast: the loss
is computed only at positions that carry a target, in fp32, summed over the whole accumulation window and divided
once by what the objective normalises by (sft: its loss tokens), so gradient accumulation gives the same update as
one big batch. The job (train/job.py) runs the phases in order and writes what follows training.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medtune.data.batching import Batch, BatchPlan, iterate
from medtune.data.prepare import PreparedData
from medtune.eval.perplexity import Perplexity, perplexity
from medtune.generate import Loaded
from medtune.models import add_lora, load_base_model
from medtune.recipe import Recipe
from medtune.run.metrics import RunDir, lr_point
from medtune.tokenizer import ChatSetup
from medtune.train.checkpoint import (
    TrainState,
    check_same_adapter,
    latest_checkpoint,
    resume_checkpoint,
    save_adapter,
    save_checkpoint,
    trim_metrics,
)
from medtune.train.distributed import shard
from medtune.train.early_stopping import EarlyStopping
from medtune.train.guard import Interrupted, NonFinite, NonFiniteGuard, StopSignals
from medtune.train.objectives import LossModule, get_objective
from medtune.train.objectives.reference import ReferenceTable, precompute_reference
from medtune.train.optim import make_optimizer, make_scheduler, warmup_steps
from medtune.train.runtime import Runtime

log = logging.getLogger("medtune")


@dataclass
class Step:
    """One optimizer step's figures, summed over its micro-batches and processes."""

    loss: float
    loss_count: float  # what the loss is divided by: loss tokens (sft) or micro-batches
    tokens: float  # real (non-padding) tokens
    grad_norm: float
    stats: dict[str, float]  # each summed over the micro-batches that reported it
    stat_counts: dict[str, int]  # how many micro-batches reported each
    stop: bool  # a signal reached some process during the step


@dataclass
class Window:
    """What the next logged line averages: the steps since the last one."""

    loss: float = 0.0
    loss_count: float = 0
    tokens: float = 0
    start: float = field(default_factory=time.perf_counter)
    stats: dict[str, float] = field(default_factory=dict)
    stat_counts: dict[str, int] = field(default_factory=dict)

    def add(self, step: Step) -> None:
        self.loss, self.loss_count, self.tokens = self.loss + step.loss, self.loss_count + step.loss_count, \
            self.tokens + step.tokens
        add_stats(self.stats, self.stat_counts, step.stats, step.stat_counts)


def add_stats(sums: dict[str, float], counts: dict[str, int], more: dict[str, float],
              more_counts: dict[str, int] | None = None) -> None:
    """Add statistics into running sums and counts (`more_counts` None: each of `more` counts once)."""
    for k, v in more.items():
        sums[k] = sums.get(k, 0.0) + v
        counts[k] = counts.get(k, 0) + (1 if more_counts is None else more_counts[k])


class NoTracker:
    """What processes other than rank 0 log to: nothing."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    def __init__(self, recipe: Recipe, runtime: Runtime, run_dir: Path, model_dir: str, tok, chat: ChatSetup):
        self.recipe, self.cfg, self.runtime = recipe, recipe.train, runtime
        self.dist = runtime.dist
        self.autocast = runtime.autocast()
        self.run_dir, self.model_dir, self.tok, self.chat = run_dir, model_dir, tok, chat
        self.objective = get_objective(self.cfg, recipe.data.max_length)
        self.reference: ReferenceTable | None = None  # train.precompute_reference (setup_reference)
        self.can_eval = self.dist.is_main and not self.dist.sharded  # evaluation calls the model outside an engine
        self.state = TrainState(step=0, base_eval={})
        self.tracker: RunDir | NoTracker = NoTracker()
        self.engine = None  # the LossModule as the engine wrapped it (fit)
        # per text, base before training and tuned after it: eval.after_train and the gate reuse them, never recompute
        self.base_perplexity: Perplexity | None = None
        self.tuned_perplexity: Perplexity | None = None
        self.last_logged: dict[str, float] = {}
        self.tokens_seen, self.train_seconds = 0, 0.0

    def setup_model(self) -> None:
        """The base model in the compute dtype (or 4-bit), its embeddings grown for added tokens, the LoRA adapter
        on top; `params` are the trainable (adapter) weights."""
        recipe, quantized = self.recipe, self.recipe.quant.load_in_4bit
        model = load_base_model(self.model_dir, dtype=self.runtime.dtype, device=self.runtime.device,
                                quant=recipe.quant, trust_remote_code=recipe.trust_remote_code,
                                attn_implementation=recipe.attn_implementation)
        if self.chat.added_tokens:
            model.resize_token_embeddings(len(self.tok))
        self.model = add_lora(model, recipe.lora, gradient_checkpointing=self.cfg.gradient_checkpointing,
                              quantized=quantized, autocast=self.runtime.bf16)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in self.params)
        log.info("model %s: %s trainable LoRA parameters (%s), base in %s, %s%s", recipe.model, f"{n_train:,}",
                 "QLoRA " + recipe.quant.quant_type if quantized else "LoRA",
                 "4 bits" if quantized else self.runtime.dtype, self.runtime.device,
                 f", {self.dist.world} processes" if self.dist.world > 1 else "")

    def setup_data(self, data: PreparedData) -> None:
        """The batch plan over the training rows and the run's length: `total_steps` optimizer steps."""
        cfg, recipe = self.cfg, self.recipe
        packable = self.objective.packable  # pairs: batch_size pairs per micro-batch, never packed
        if cfg.packing and not packable:
            log.info("train.packing is off for train.objective=%s: a pair's chosen and rejected answers share a batch",
                     cfg.objective)
        self.data = data
        self.plan = BatchPlan([self.objective.row_length(s) for s in data.train], cfg.batch_size, cfg.seed,
                              packing=cfg.packing and packable, group_by_length=cfg.group_by_length,
                              max_length=recipe.data.max_length)
        per_step = cfg.grad_accum * self.dist.world  # micro-batches consumed per optimizer step, all processes
        self.steps_per_epoch = math.ceil(len(self.plan) / per_step)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * self.steps_per_epoch))

    def setup_optimizer(self) -> None:
        """Optimizer and schedule over the adapter's weights; with resume=true, their state, the RNGs and the data
        position from the newest whole checkpoint."""
        self.optimizer = make_optimizer(self.cfg, self.params)
        self.scheduler = make_scheduler(self.cfg, self.optimizer, self.total_steps)
        self.warmup = warmup_steps(self.cfg, self.total_steps)
        if self.recipe.resume:
            check_same_adapter(self.run_dir, self.recipe.lora.model_dump())
            ckpt, self.state = resume_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler)
            if self.dist.is_main:
                trim_metrics(self.run_dir, self.state.step)
            log.info("resuming from %s (step %d of %d)", ckpt, self.state.step, self.total_steps)

    def setup_reference(self) -> None:
        """train.precompute_reference (dpo): the reference (adapter off) log-probs of every training pair, computed
        once with the first epoch's batches; each step then takes its pairs' from the table instead of a second
        forward pass. Resume computes the table again (the reference never changes: the same values)."""
        if not self.cfg.precompute_reference:
            return
        start = time.perf_counter()
        self.reference = precompute_reference(self.objective, self.model, self.data.train, self.plan,
                                              self.chat.pad_token_id, self.recipe.tokenizer.padding_side,
                                              self.autocast, self.runtime.device)
        log.info("reference log-probs of %d training pairs computed in %.1f s (train.precompute_reference)",
                 len(self.data.train), time.perf_counter() - start)

    def start_tracking(self) -> None:
        """metrics.jsonl and the recipe's trackers, on rank 0; after resume has cut metrics.jsonl to its step."""
        recipe = self.recipe
        if self.dist.is_main:
            self.tracker = RunDir(self.run_dir, run_name=self.run_dir.name, config=recipe.to_dict(),
                                  report_to=recipe.report_to, wandb_project=recipe.wandb_project, resume=recipe.resume)

    def evaluate_base(self) -> None:
        """The base model's held-out figures (train.eval_before), kept in the state as base_*: sft through
        eval.perplexity with the adapter off (kept per text for eval.after_train), others by `evaluate`."""
        if not (self.cfg.eval_before and self.data.eval and not self.state.base_eval and self.can_eval):
            return
        if self.objective.perplexity:
            self.base_perplexity = self.held_out_perplexity(use_adapter=False)
            base = self.base_perplexity.eval_figures()
        else:
            base = self.evaluate()
        self.state.base_eval = {f"base_{k}": v for k, v in base.items()}
        log.info("base model on held-out data: loss %.4f%s", base["eval_loss"],
                 f", perplexity {base['eval_ppl']:.4g}" if "eval_ppl" in base else "")
        self.tracker.log({k: base[k] for k in ("eval_loss", "eval_ppl") if k in base}, step=0)

    def fit(self) -> None:
        """Train from the state's step to `total_steps` (or an early stop). A signal ends the run after the step in
        progress with a checkpoint and exit 128 + signal; a second one at once."""
        self.engine, self.optimizer = self.dist.prepare(LossModule(self.model, self.autocast, self.objective),
                                                        self.optimizer)
        self.engine.train()
        batches = shard(self.micro_batches(self.state.micro), self.dist.rank, self.dist.world)
        guard, stopper = NonFiniteGuard(self.cfg.nan_policy), EarlyStopping(self.cfg.early_stopping_patience)
        self.window = Window()
        run_start = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.dist.is_main)
        if self.dist.is_main and self.state.step == 0:
            self.tracker.log(lr_point(self.scheduler), step=0)  # the rate of the first step: the warm-up starts here
        with StopSignals() as signals:
            try:
                while self.state.step < self.total_steps:
                    step = self._step(batches, guard, signals)
                    if step is None:  # skipped (train.nan_policy=skip_batch)
                        continue
                    self._log(step, bar)
                    if self._stops_early(stopper):
                        break
                    if step.stop:  # a signal reached some process during this step: all stop after it
                        raise Interrupted(signals.signum or signal.SIGTERM, step_finished=True)
                    if self.cfg.save_steps and self.state.step % self.cfg.save_steps == 0 \
                            and self.state.step < self.total_steps:
                        self.save_checkpoint()
            except Interrupted as halt:
                bar.close()  # before the message, not after it
                self._stop(halt, signals)
            finally:
                bar.close()
        self.train_seconds = time.perf_counter() - run_start

    def evaluate(self) -> dict[str, float]:
        """The objective's held-out figures for the model as it is now ({} without held-out data)."""
        if not self.data.eval:
            return {}
        return self.objective.evaluate(self.model, self.data.eval, pad_id=self.chat.pad_token_id,
                                       batch_size=self.cfg.batch_size, autocast=self.autocast,
                                       device=self.runtime.device)

    def evaluate_tuned(self) -> dict[str, float]:
        """The held-out figures after training; sft through eval.perplexity, kept per text (tuned_perplexity) so
        that eval.after_train and the gate do not score the held-out texts again."""
        if not self.objective.perplexity:
            return self.evaluate()
        self.tuned_perplexity = self.held_out_perplexity(use_adapter=True)
        return self.tuned_perplexity.eval_figures()

    def held_out_perplexity(self, use_adapter: bool) -> Perplexity:
        """eval.perplexity on the held-out texts, one window per text (texts are at most max_length): the same
        figures as the objective's `evaluate`, plus the per-text rows paired comparisons need."""
        return perplexity(self.loaded(), self.data.eval, batch_size=self.cfg.batch_size, use_adapter=use_adapter,
                          progress=False)

    def save_checkpoint(self) -> Path | None:
        """checkpoints/step-N (rank 0; under FSDP / ZeRO-3 every rank gathers the adapter first)."""
        adapter = self.dist.adapter_state(self.engine)
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.state,
                               self.cfg.keep_last_n, adapter)

    def save_final(self) -> None:
        """The run's adapter and a last checkpoint; then the processes part."""
        adapter = self.dist.adapter_state(self.engine)
        if self.dist.is_main:
            save_adapter(self.run_dir, self.model, adapter)
            save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.state, self.cfg.keep_last_n,
                            adapter)
        self.dist.barrier()
        self.dist.close()

    def micro_batches(self, start: int) -> Iterator[Batch]:
        """Endless micro-batches across epochs, starting after `start` already-consumed ones (resume)."""
        epoch, skip = divmod(start, len(self.plan))
        while True:
            batches = iterate(self.data.train, self.plan, epoch, self.chat.pad_token_id,
                              self.recipe.tokenizer.padding_side, skip=skip)
            if self.reference is not None:  # each batch brings its pairs' reference log-probs
                batches = map(self.reference.attach, batches, self.plan.batches(epoch)[skip:])
            yield from batches
            epoch, skip = epoch + 1, 0

    def _step(self, batches: Iterator[Batch], guard: NonFiniteGuard, signals: StopSignals) -> Step | None:
        """Forward and backward over grad_accum micro-batches, then one optimizer step; None when the guard skips
        it. The loss is divided once by the whole step's count (all processes): sft its loss tokens, others its
        micro-batches."""
        cfg, dist = self.cfg, self.dist
        micro = [next(batches).to(self.runtime.device) for _ in range(cfg.grad_accum)]
        (n_loss,) = dist.sum([sum(self.objective.loss_count(b) for b in micro)])
        step_loss, step_stats, stat_counts = 0.0, {}, {}
        for b in micro:
            with dist.accumulate(self.engine):
                loss, stats = self.engine(b)
                dist.backward(loss, n_loss, cfg.grad_accum)
            step_loss += loss.item()
            add_stats(step_stats, stat_counts, stats)
        grad_norm = dist.clip_grad_norm(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        step_loss, real, stop = dist.sum([step_loss, sum(b.num_tokens for b in micro),
                                          float(signals.signum is not None)])
        try:
            skip = guard.bad(self.state.step + 1, step_loss / max(n_loss, 1), grad_norm)
        except NonFinite as e:
            self.optimizer.zero_grad(set_to_none=True)
            path = self.save_checkpoint()  # the weights before the bad step: resumable with nan_policy=skip_batch
            e.args = (f"{e.args[0]}; checkpoint {path}",)
            raise
        self.state.micro += cfg.grad_accum * dist.world
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped.append(self.state.step + 1)
            log.warning("step %d: non-finite loss or gradient, batch skipped (train.nan_policy=skip_batch)",
                        self.state.step + 1)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return Step(step_loss, n_loss, real, grad_norm, step_stats, stat_counts, bool(stop))

    def _log(self, step: Step, bar) -> None:
        """Add the step to the window; every logging_steps (and at the end) log its averages and open a new one;
        every warm-up step in between, the learning rate (so the plot shows the ramp)."""
        self.window.add(step)
        self.tokens_seen += step.tokens
        bar.update(1)
        n = self.state.step
        if n % self.cfg.logging_steps == 0 or n == self.total_steps:
            self.last_logged = self._window_figures(step.grad_norm)
            self.tracker.log(self.last_logged, step=n)
            bar.set_postfix(loss=f"{self.last_logged['loss']:.4f}", tok_s=f"{self.last_logged['tokens_per_s']:.0f}")
            self.window = Window()
        elif n <= self.warmup:
            self.tracker.log(lr_point(self.scheduler), step=n)

    def _window_figures(self, grad_norm: float) -> dict[str, float]:
        """The logged line: the window's mean loss (and statistics), the rate now, the last step's gradient norm."""
        w = self.window
        out = {"loss": w.loss / w.loss_count, "learning_rate": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "tokens_per_s": w.tokens / (time.perf_counter() - w.start), "tokens_seen": self.tokens_seen,
               "epoch": self.state.step / self.steps_per_epoch}
        names = self.objective.stat_names  # the same list on every process, whatever its batches reported
        if names:
            totals = self.dist.sum([w.stats.get(k, 0.0) for k in names] + [w.stat_counts.get(k, 0) for k in names])
            out |= {k: v / n for k, v, n in zip(names, totals[: len(names)], totals[len(names):], strict=True) if n}
        return out

    def _stops_early(self, stopper: EarlyStopping) -> bool:
        """Every eval_steps (not at the last step): evaluate, log, and ask early stopping."""
        n, cfg = self.state.step, self.cfg
        if not (cfg.eval_steps and n % cfg.eval_steps == 0 and n < self.total_steps and self.data.eval
                and self.can_eval):
            return False
        result = self.evaluate()
        self.tracker.log(result, step=n)
        if not stopper.should_stop(result["eval_loss"]):
            return False
        log.info("early stop at step %d: held-out loss has not improved for %d evaluations (best %.4f)", n,
                 stopper.patience, stopper.best)
        return True

    def _stop(self, halt: Interrupted, signals: StopSignals) -> None:
        """After a signal: checkpoint the finished step (not after a second signal), say how to resume, exit."""
        self.optimizer.zero_grad(set_to_none=True)
        message = f"step abandoned; last complete checkpoint {latest_checkpoint(self.run_dir)}"
        if halt.step_finished:
            try:
                message = f"checkpoint {self.save_checkpoint()}"
            except Interrupted:  # a second signal while it was written: the half-written one is removed
                message = ("second signal: checkpoint abandoned; last complete checkpoint "
                           f"{latest_checkpoint(self.run_dir)}")
        signals.ignore()  # from here on a further signal must not cut the message short
        self.tracker.close()
        if self.dist.is_main:
            print(f"\ninterrupted at step {self.state.step}/{self.total_steps}; {message}\n"
                  f"resume with: medtune train <recipe> output_dir={self.run_dir} resume=true", flush=True)
        raise SystemExit(128 + halt.signum) from None

    def loaded(self) -> Loaded:
        """The model in training as `generate` / `medtune eval` see a loaded run."""
        recipe = self.recipe
        return Loaded(self.model, self.tok, self.chat.stop_token_ids, self.chat.pad_token_id, recipe.model, True,
                      recipe.data.max_length, torch.bfloat16 if self.runtime.bf16 else None)

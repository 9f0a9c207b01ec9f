"""One `medtune train`: prepare the data, choose and lock the run directory, run the trainer's phases, then what
follows training: held-out figures of the tuned model, sample answers, the card, eval.after_train and the gate.

Under torchrun / accelerate launch every process runs the job; only rank 0 writes and reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from medtune.data.pipeline import prepare_inputs
from medtune.data.prepare import PreparedData
from medtune.errors import MedtuneError
from medtune.eval.gate import check_gate, gate_after_train
from medtune.eval.suite import after_train
from medtune.generate import Loaded, generate, user_turn
from medtune.recipe import Recipe
from medtune.run.card import write_card
from medtune.run.run import Run
from medtune.train.checkpoint import writing
from medtune.train.memory import check_memory, estimate_for_recipe
from medtune.train.runtime import start_runtime
from medtune.train.trainer import Trainer

log = logging.getLogger("medtune")


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]
    samples: list[dict]
    main: bool = True  # False on the other processes of a distributed run (they write and report nothing)
    gate: dict | None = None  # eval.gate: the release gate's report (RUN/gate.json)


def run_training(recipe: Recipe, force: bool = False) -> TrainResult:
    """Train one recipe. `force`: start even when the memory estimate says it will not fit.
    Under torchrun / accelerate launch every process calls this; only rank 0 writes and reports."""
    runtime = start_runtime(recipe)
    dist = runtime.dist
    inputs = prepare_inputs(recipe)
    model_dir, tok, chat, data = inputs.model_dir, inputs.tok, inputs.chat, inputs.data
    for line in data.report.lines():
        log.info(line)
    if recipe.train.early_stopping_patience and not data.eval:  # the split left no held-out rows
        raise MedtuneError("train.early_stopping_patience needs train.eval_steps > 0 and held-out data",
                           field="train.early_stopping_patience")
    if recipe.eval.gate:  # a mistake in the gate's config stops us before the model loads
        check_gate(recipe.gate, held_out=bool(data.eval))
    log.info(check_memory(estimate_for_recipe(recipe, model_dir, runtime.device, runtime.bf16), runtime.device, force))

    run = Run(dist.broadcast(Run.create(recipe).path if dist.is_main else None))
    run_dir = run.path
    lock = run.lock() if dist.is_main else None
    try:
        if dist.is_main:
            with writing(run_dir, "the run directory"):
                run.write_data_report(data.report.to_dict())
        trainer = Trainer(recipe, runtime, run_dir, model_dir, tok, chat)
        train(trainer, data, run)
        if not dist.is_main:
            return TrainResult(run_dir, {}, [], main=False)
        return after_training(trainer, run)
    finally:
        if lock is not None:
            lock.release()


def train(trainer: Trainer, data: PreparedData, run: Run) -> None:
    """The trainer's phases in order, the run files written (rank 0) once the base is measured."""
    trainer.setup_model()
    trainer.setup_data(data)
    trainer.setup_optimizer()
    trainer.setup_reference()
    trainer.start_tracking()
    trainer.evaluate_base()
    if trainer.dist.is_main:
        recipe, runtime = trainer.recipe, trainer.runtime
        precision = ("bf16" if runtime.bf16 else "fp32") + \
            (f", 4-bit {recipe.quant.quant_type} base" if recipe.quant.load_in_4bit else "")
        with writing(trainer.run_dir, "the run directory"):
            run.save_files(recipe, trainer.tok, trainer.chat, trainer.model_dir, runtime.device,
                           precision)
    trainer.fit()
    trainer.save_final()


def after_training(trainer: Trainer, run: Run) -> TrainResult:
    """Rank 0, after the adapter is saved: the tuned model's held-out figures, sample answers, metrics, the card,
    eval.after_train and the release gate."""
    recipe, state, data, run_dir = trainer.recipe, trainer.state, trainer.data, trainer.run_dir
    metrics: dict[str, float] = {"steps": state.step, "train_loss": trainer.last_logged.get("loss", float("nan")),
                                 "tokens_per_s": trainer.tokens_seen / max(trainer.train_seconds, 1e-9),
                                 "train_seconds": trainer.train_seconds, **state.base_eval}
    if state.skipped:
        metrics["skipped_batches"] = len(state.skipped)
    can_eval = trainer.can_eval
    trainer.model.eval()  # training is over: no dropout in what follows (held-out figures, answers, tasks, gate)
    if can_eval:
        announce_after_train(recipe, data)
    if data.eval and can_eval:
        log.info("held-out eval (tuned): %d rows...", len(data.eval))
        final = trainer.evaluate_tuned()
        trainer.tracker.log(final, step=state.step)
        metrics.update(final)
    samples = sample_answers(recipe, trainer.loaded(), data) if can_eval else []
    trainer.tracker.plots(metrics)
    trainer.tracker.close()
    run.write_final(metrics, samples)
    write_card(run_dir)
    measured = dict(held_out=data.eval, base=trainer.base_perplexity, tuned=trainer.tuned_perplexity)
    if recipe.eval.after_train and can_eval:
        after_train(recipe, run_dir, trainer.loaded(), **measured)
    gate = None
    if recipe.eval.gate and can_eval:
        gate = gate_after_train(recipe, run_dir, trainer.loaded(), **measured)
    return TrainResult(run_dir, metrics, samples, gate=gate)


def announce_after_train(recipe: Recipe, data: PreparedData) -> None:
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


def sample_answers(recipe: Recipe, loaded: Loaded, data: PreparedData) -> list[dict]:
    """Answers of the base (adapter off) and the tuned model to the recipe's sample prompts, then to the prompts of
    the first `samples.from_eval` held-out rows; greedy, with the recipe's repetition control."""
    cfg = recipe.samples
    conversations = [(user_turn(p, recipe.tokenizer.system_prompt), None) for p in cfg.prompts]
    refs = data.eval_references
    conversations += [(p, refs[i] if i < len(refs) else None) for i, p in enumerate(data.eval_prompts[: cfg.from_eval])
                      if p]  # held-out rows: never trained on; their own answer is the reference
    if not conversations:
        return []
    kw = {"max_new_tokens": cfg.max_new_tokens, **{k: v for k, v in (("repetition_penalty", cfg.repetition_penalty),
                                                                     ("no_repeat_ngram_size", cfg.no_repeat_ngram_size))
                                                   if v is not None}}
    model = loaded.model
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

"""Every file and folder of a run directory, named once.

```
runs/<name>/
  adapter_config.json, adapter_model.safetensors   the PEFT adapter (ADAPTER_FILES)
  tokenizer files, chat_template.jinja, generation_config.json (stops on the end-of-turn tokens)
  medtune.json        run meta: base model, template, stop/pad tokens, versions, hardware (run/meta.py)
  recipe.yaml         the resolved recipe
  data_report.json    what happened to every row (and `hygiene`, when the data step reports it)
  metrics.jsonl       one {"step": ..., <metric>: ...} object per log call
  metrics_final.json  the run's final figures
  samples.json        base vs tuned answers to the recipe's sample prompts
  plots/*.png         loss, learning rate, gradient norm
  gate.json           `medtune gate` / eval.gate: every axis's verdict and the overall pass/fail (eval/gate.py)
  plots/gate.png      the gate's forest plot: delta and 95% interval per axis, tolerance marked (eval/forest.py)
  eval/<task>.json    `medtune eval` / eval.after_train results (and <task>.md)
  checkpoints/step-N/ resumable checkpoints: the adapter files, trainer_state.json (step, data position),
                      training.pt (optimizer, scheduler, RNG states) (train/checkpoint.py)
  .medtune.lock       held while a training writes the run (run/lock.py)
  tensorboard/, wandb/, mlflow.db   trackers (report_to)
  README.md           the model card (run/card.py)
```
"""

from __future__ import annotations

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# the tokenizer as transformers saves it (which of them a tokenizer writes depends on its kind)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"
META = "medtune.json"
RECIPE = "recipe.yaml"
DATA_REPORT = "data_report.json"
METRICS = "metrics.jsonl"
METRICS_FINAL = "metrics_final.json"
SAMPLES = "samples.json"
PLOTS = "plots"
EVAL = "eval"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
MLFLOW_DB = "mlflow.db"
CARD = "README.md"
GATE = "gate.json"
GATE_PLOT = f"{PLOTS}/gate.png"
LOCK = ".medtune.lock"
STEP_PREFIX = "step-"  # checkpoints/step-0000012
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training.pt"


def step_name(step: int) -> str:
    """A checkpoint folder's name: step-0000012 (zero-padded, so names sort as steps do)."""
    return f"{STEP_PREFIX}{step:07d}"


def is_step_name(name: str) -> bool:
    """Is `name` a checkpoint folder's name (not a half-written `step-N.tmp` or a replaced `step-N.old`)?"""
    return name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit()

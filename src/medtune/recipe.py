"""Recipes are data: a typed, validated description of one fine-tuning job.

A recipe is a YAML file plus `key=value` overrides from the command line (`lora.r=16`). Every field's
description below is also its help text (`medtune train --help` prints them). Unknown keys and wrong
types are user errors (exit 2) that name the file and the key.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtune.data.guard import DEFAULT_MAX_ROW_BYTES
from medtune.errors import MedtuneError
from medtune.recipe_guard import load_yaml
from medtune.recipe_keys import is_text_key, keys_help, suggest_key
from medtune.recipe_rules import RuleBroken, check_rules

DEFAULT_MODEL = "smollm2-135m-instruct"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


FORMATS = Literal["text", "messages", "instruction", "qa", "template"]
FORMAT_ALIASES = {"alpaca": "instruction", "sharegpt": "messages"}  # the names other tools give these layouts


def _format_alias(v: Any) -> Any:
    return FORMAT_ALIASES.get(v.lower(), v) if isinstance(v, str) else v


class DataSource(Section):
    path: str = Field(description="This source's data (same kinds as data.path, e.g. demo:qa).")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight; probabilities are the weights divided "
                          "by their sum (times 1 - replay.share when replay is on).")
    format: FORMATS | None = Field(None, description="This source's format; default data.format.")
    columns: dict[str, str] | None = Field(None, description="This source's column map; default data.columns.")
    prompt_template: str | None = Field(None, description="format=template: this source's prompt; default data.prompt_template.")
    response_template: str | None = Field(None, description="format=template: this source's answer; default data.response_template.")

    _alias = field_validator("format", mode="before")(_format_alias)


class ReplayConfig(Section):
    path: str | None = Field(None, description="General (non-medical) instruction data mixed in against forgetting, "
                             "e.g. demo:general (shipped with medtune). None = no replay.")
    share: float = Field(0.2, gt=0, lt=1, description="Probability that a training row is drawn from the replay data "
                         "(0.2 = about 20% of rows). Higher = less forgetting, slower medical gains.")
    format: FORMATS = Field("qa", description="Format of the replay data (demo:general is qa).")
    columns: dict[str, str] = Field(default_factory=dict, description="Column map of the replay data.")

    _alias = field_validator("format", mode="before")(_format_alias)


class DataConfig(Section):
    path: str = Field("demo:terms", description="Training data: a .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk folder, "
                      "a hub dataset name (online), or demo:<name> for data shipped with medtune (terms, doctor_chats, remedies, qa, preferences, feedback, general).")
    format: Literal["text", "messages", "instruction", "qa", "template", "preference", "feedback"] = Field(
        "template", description="How rows become conversations: text (pre-formatted strings), messages (chat turns), "
        "instruction (instruction/input/output), qa (question/answer), template (prompt and response built from columns), "
        "preference (prompt/chosen/rejected, as strings or chat-turn lists; for train.objective dpo, orpo or simpo), "
        "feedback (prompt/completion/label: one answer and a reviewer's thumbs up or down, label true/false, yes/no, "
        "up/down or 1/0; for train.objective kto). alpaca and sharegpt are accepted as instruction and messages.")
    columns: dict[str, str] = Field(default_factory=dict, description="Map medtune's field names to your column names, "
                                    "e.g. {question: Question, answer: Answer}.")
    prompt_template: str | None = Field(None, description="format=template: Jinja text of the user prompt; columns are "
                                        "variables, or row['Column Name'] for names with spaces.")
    response_template: str | None = Field(None, description="format=template: Jinja text of the answer to learn.")
    split: str = Field("train", description="Split to read from a hub dataset or a DatasetDict folder.")
    eval_path: str | None = Field(None, description="Held-out data file (same format); overrides eval_ratio.")
    eval_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows held out for evaluation when eval_path is "
                              "not given (seeded shuffle). 0 = no eval split.")
    limit: int | None = Field(None, gt=0, description="Use only the first N rows (quick trials).")
    max_row_bytes: int = Field(DEFAULT_MAX_ROW_BYTES, gt=0, description="Largest row (its text, in bytes) read from "
                               "any data file, and longest text a prompt/response template may render; a larger one "
                               "is an error naming it. Bounds memory against a runaway line or template.")
    max_length: int = Field(512, gt=8, description="Longest tokenized example. Higher = more memory per step.")
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="Examples longer than max_length: truncate the answer, drop the row, or stop with an error. "
        "A prompt that alone exceeds max_length is always an error unless this is 'drop'.")
    on_bad_row: Literal["error", "drop"] = Field(
        "error", description="A row that is empty or malformed: stop with an error naming it, or drop it (counted in the report).")
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt/system tokens (default: answers only).")
    add_eos: bool = Field(True, description="format=text: append the end-of-sequence token when a text lacks it, so the model learns to stop.")
    decontaminate: list[str] = Field(default_factory=list, description="Benchmarks training rows must not overlap, "
                                     "as task=PATH (tasks: medqa, pubmedqa, mmlu_medical (a folder), medmcqa); a row "
                                     "sharing a 13-word sequence with an item is contaminated.")
    on_contaminated: Literal["error", "drop", "allow"] = Field(
        "error", description="Rows overlapping a data.decontaminate benchmark: stop with an error naming them, drop "
        "them (counted in the report), or keep them (reported).")
    near_duplicates: Literal["report", "drop"] = Field(
        "report", description="Rows nearly identical to an earlier row (MinHash Jaccard >= near_duplicate_threshold): "
        "report them, or drop them and keep the first.")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of word 3-grams above "
                                            "which two rows count as near-duplicates. Lower = more rows flagged.")
    phi: Literal["off", "report", "redact"] = Field(
        "report", description="Scan rows for identifiers (emails, phones, SSNs, IPs, URLs, dates, record numbers, "
        "street addresses; names when a spaCy NER model is installed): off, report counts, or redact them "
        "to <EMAIL>, <PHONE>, ... before training.")

    @field_validator("phi", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false

    _alias = field_validator("format", mode="before")(_format_alias)
    sources: list[DataSource] = Field(default_factory=list, description="Several weighted sources mixed by "
                                      "datasets.interleave_datasets (seeded by train.seed) instead of data.path: a list "
                                      "of {path, weight (default 1), format, columns, prompt_template, response_template}; "
                                      "unset keys fall back to data.*. Empty = data.path alone.")
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="General-data replay against forgetting.")
    stopping_strategy: Literal["all_exhausted", "first_exhausted"] = Field(
        "all_exhausted", description="Mixing: all_exhausted repeats the smaller sources until every row of every source "
        "was drawn; first_exhausted stops when one source runs out (no repeats, rows of the others left unused).")


class TokenizerConfig(Section):
    template: str = Field("auto", description="Chat template: auto (the tokenizer's own, else chatml if the tokenizer "
                          "has <|im_start|>, else llama2), chatml, llama2, or a path to a .jinja file.")
    system_prompt: str | None = Field(None, description="System message put before every conversation that has none.")
    pad_token: str = Field("auto", description="auto picks a pad token that is not end-of-turn; 'eos' copies the "
                           "seed notebooks (risky: tools that mask padding by id stop learning to end answers).")
    padding_side: Literal["right", "left"] = Field("right", description="Where padding goes in training batches.")


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank. Higher = more trainable parameters and memory, more capacity.")
    alpha: float = Field(32, gt=0, description="LoRA scale numerator; the update is scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input. Higher = more regularisation.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Layers that get adapters: names like q_proj, or all-linear. More = slower, more capacity.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA). Slower per step.")


class QuantConfig(Section):
    load_in_4bit: bool = Field(False, description="QLoRA: keep frozen base weights in 4 bits (bitsandbytes). Less memory, slower on CPU.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Also quantise the quantisation constants (saves ~0.4 bit/parameter).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of 4-bit matmuls; auto = bfloat16 where supported, else float32.")


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps to run; -1 = derive from epochs.")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch (packed rows with packing). Higher = more memory.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step. Effective batch = batch_size x grad_accum.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    optimizer: Literal["adamw", "adamw_fused", "sgd"] = Field("adamw", description="Optimizer for the LoRA parameters.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="How the learning rate moves from its peak to the end of training.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up (wins over warmup_ratio when > 0).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps used for warm-up.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this; 0 = no clipping.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    release_memory: bool = Field(False, description="CPU only: hand freed activation memory back to the OS at once "
                                 "(glibc mmap threshold). Peak RSS -1.5 GB on SmolLM2 batch 4 x 512, but steps ~40% "
                                 "slower (fresh pages every step). For machines where memory, not time, is short.")
    packing: bool = Field(True, description="Pack several examples into each row of max_length (position ids restart "
                          "per example, no attention across them): no compute spent on padding. batch_size then counts "
                          "rows. false = one padded example per row.")
    group_by_length: bool = Field(False, description="Batch examples of similar length together: less padding.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 where the hardware has fast bf16 "
                                                        "(CPUs with AVX512-BF16 or AMX, Ampere+ GPUs), else fp32. LoRA weights, "
                                                        "optimizer state and loss stay fp32.")
    eval_steps: int = Field(0, ge=0, description="Evaluate (loss, perplexity) every N steps; 0 = only before and after training.")
    eval_before: bool = Field(True, description="Measure held-out loss/perplexity of the base model before training.")
    early_stopping_patience: int = Field(0, ge=0, description="Stop when held-out loss has not improved for this many "
                                         "evaluations in a row (needs eval_steps > 0); 0 = never stop early.")
    logging_steps: int = Field(10, gt=0, description="Log loss, lr, grad norm and tokens/s every N steps.")
    save_steps: int = Field(0, ge=0, description="Write a resumable checkpoint every N steps; 0 = only on interrupt and at the end.")
    keep_last_n: int = Field(0, ge=0, description="Keep only the newest N checkpoints (older ones are deleted once a newer "
                             "one is complete); 0 = keep all.")
    nan_policy: Literal["stop", "skip_batch"] = Field(
        "stop", description="A step whose loss or gradient is NaN/Inf: stop (checkpoint the weights before it and say "
        "which step), or skip_batch (drop that batch, no update; stops after 10 bad batches in a row).")
    seed: int = Field(42, ge=0, lt=2**64, description="Seed for data order, dropout and initialisation (0 to 2**64-1).")
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto"] = Field(
        "sft", description="sft: learn the answers (cross-entropy). dpo: raise the likelihood of each chosen answer over "
        "its rejected one relative to the base model (the same model with the adapter off; no second copy). orpo: "
        "cross-entropy on the chosen answer plus an odds-ratio penalty on the rejected one (no reference). simpo: "
        "the chosen answer's per-token log-likelihood above the rejected one's by a margin (no reference; long answers "
        "get no advantage). dpo, orpo and simpo need data.format=preference. kto: thumbs up/down on single answers "
        "(data.format=feedback): raise liked answers and lower disliked ones relative to the base model (adapter off). "
        "None of them packs (a pair, or a KTO batch with its KL rows, shares a batch).")
    beta: float = Field(0.1, gt=0, description="dpo and kto: how far the tuned model may drift from the base; "
                        "higher = stays closer to it, lower = follows the preferences more aggressively. orpo: lambda, "
                        "the weight of the odds-ratio term against the cross-entropy; higher = pushes rejected answers "
                        "down harder. simpo: the scale of the length-normalised reward (the SimPO paper uses 2 to 10).")
    dpo_loss_type: Literal["sigmoid", "ipo", "robust", "hinge"] = Field(
        "sigmoid", description="dpo: the loss on the reward margin, as TRL names it. sigmoid: DPO's own. ipo: squared "
        "distance of the per-token margin from 1/(2 beta); does not push the margin without bound (less overfitting "
        "on small data). robust: sigmoid corrected for a share train.label_smoothing of pairs labelled the wrong "
        "way round. hinge: SLiC's max(0, 1 - beta x margin).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo with dpo_loss_type=robust, or simpo: the share "
                                   "of pairs believed to be labelled the wrong way round (0 to 0.5). 0 = trust every "
                                   "label.")
    precompute_reference: bool = Field(False, description="dpo: compute the reference (adapter off) log-probs of "
                                       "every training pair once before training instead of in every step: one "
                                       "forward pass fewer per step, same losses.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the liked (label true) answers' loss. "
                                        "Raise it when liked answers are rarer than disliked ones (the KTO paper "
                                        "keeps weight x count of the two about equal, up to 4:3).")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the disliked (label false) answers' "
                                          "loss. Raise it when disliked answers are the rarer ones.")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin gamma between chosen and "
                               "rejected answers (TRL's simpo_gamma; the paper's gamma_beta_ratio is gamma / beta). "
                               "Higher = asks for a wider separation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train; auto = cuda when available.")


class EvalConfig(Section):
    after_train: list[Literal["perplexity", "medqa", "pubmedqa", "mmlu_medical", "medmcqa", "rouge"]] = Field(
        default_factory=list, description="`medtune eval` tasks run when training ends (base vs tuned on the same "
        "items), written to RUN/eval/ and the model card. perplexity uses the held-out split; the others need their "
        "file below.")
    medqa: str | None = Field(None, description="MedQA 4-option .jsonl (question, options A-D, answer_idx).")
    pubmedqa: str | None = Field(None, description="PubMedQA ori_pqal.json (QUESTION, CONTEXTS, final_decision).")
    mmlu_medical: str | None = Field(None, description="Folder of MMLU <subject>_<split>.csv for the medical subjects.")
    medmcqa: str | None = Field(None, description="MedMCQA .json (question, opa-opd, cop).")
    rouge: str | None = Field(None, description="Dialogue/QA file for rouge, read with this recipe's data format.")
    limit: int | None = Field(None, gt=0, description="Only the first N items of each benchmark (quick checks).")
    fewshot: int = Field(0, ge=0, description="k-shot benchmark prompts; needs fewshot_data.")
    fewshot_data: dict[str, str] = Field(default_factory=dict, description="Task → file the shots come from, "
                                         "e.g. {mmlu_medical: mmlu/dev}.")
    compare_base: bool = Field(True, description="Also score the base model (adapter off) and report deltas with "
                               "95% paired-bootstrap intervals. Doubles the evaluation time.")
    gate: bool = Field(False, description="Run the release gate (the `gate:` section) when training ends, after "
                       "after_train: RUN/gate.json, plots/gate.png, the card's Release gate section; `medtune train` "
                       "then exits 1 when a gating axis regressed.")


AXIS_KEY = re.compile(r"[a-z0-9_]+\.[A-Za-z0-9_]+")


class GateAxis(Section):
    """One axis's settings in `gate.axes`; an unset (null) key keeps the axis's default (medtune.eval.gate.AXES:
    gating, tolerance 0, no_regression for the axes medtune knows)."""

    gating: bool | None = Field(None, description="A regression on this axis fails the gate (false: reported only).")
    tolerance: float | None = Field(None, ge=0, description="How far the axis may move the worse way, in the "
                                    "metric's own units (rates are 0-1: 0.02 = 2 points; perplexity: perplexity units).")
    require: Literal["no_regression", "non_inferior"] | None = Field(
        None, description="no_regression: regressed when the 95% interval lies entirely on the worse side of 0 and "
        "the delta is worse than the tolerance. non_inferior (stricter, for safety axes): regressed unless the "
        "interval's worse end stays within the tolerance.")


class GateConfig(Section):
    tasks: list[str] = Field(default_factory=lambda: ["perplexity"], description="`medtune eval` tasks of the gate's "
                             "suite (perplexity: the run's held-out split); every task named in gate.data joins too.")
    data: dict[str, str] = Field(default_factory=dict, description="Task → file, as `medtune eval --data TASK=PATH` "
                                 "(e.g. {medqa: medqa/test.jsonl}); perplexity=FILE replaces the held-out split.")
    axes: dict[str, GateAxis] = Field(default_factory=dict, description="Per-axis settings, keyed task.metric: "
                                      "{gating, tolerance, require}, e.g. {medqa.acc: {tolerance: 0.02}}; unset keys "
                                      "keep the axis's defaults (medtune.eval.gate.AXES); an axis not there is added.")
    limit: int | None = Field(None, gt=0, description="Only the first N items of each task (quick gates).")
    bootstrap: int = Field(1000, gt=0, description="Paired-bootstrap resamples per axis.")
    options: dict[str, Any] = Field(default_factory=dict, description="Other `medtune eval` options by name "
                                    "(medtune.eval.suite.EvalOptions), e.g. {max_new_tokens: 96, fewshot: 5}.")

    @field_validator("axes")
    @classmethod
    def _axis_keys(cls, v: dict) -> dict:
        bad = [k for k in v if not AXIS_KEY.fullmatch(k)]
        if bad:
            raise ValueError(f"axes are keyed task.metric (e.g. medqa.acc), not {bad[0]!r}")
        return v


class SamplesConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts answered by the base and the tuned model at the end "
                               "of training (printed, and written to the model card).")
    from_eval: int = Field(0, ge=0, description="Also answer the prompts of the first N held-out rows (never "
                           "trained on), after `prompts`; needs a chat data format.")
    max_new_tokens: int = Field(128, gt=0, description="Length limit of each sample answer.")
    repetition_penalty: float | None = Field(None, gt=0, description="Penalty on tokens already seen (1.0 = off); "
                                             "default medtune.generate.REPETITION_PENALTY (1.2).")
    no_repeat_ngram_size: int | None = Field(None, ge=0, description="Never repeat an N-token sequence in an "
                                             "answer (0 = off); default medtune.generate.NO_REPEAT_NGRAM_SIZE (4).")


class Recipe(Section):
    """A fine-tuning job: which model, which data, how to adapt it, and what to report."""

    name: str | None = Field(None, description="Run name; default: the recipe file name.")
    model: str = Field(DEFAULT_MODEL, description="Base model: smollm2-135m-instruct (offline default), a local folder, or a hub id.")
    output_dir: str | None = Field(None, description="Run directory; default runs/<name>.")
    resume: bool = Field(False, description="Continue from the last checkpoint in output_dir.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers besides metrics.jsonl and PNG plots.")
    wandb_project: str = Field("medtune", description="W&B project (offline mode works without an account).")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with a hub model. Off unless you trust it.")
    attn_implementation: str = Field("sdpa", description="Attention kernel: sdpa, eager, or flash_attention_2 (CUDA).")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Chat template, system prompt, padding.")
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluations after training (`medtune eval`).")
    gate: GateConfig = Field(default_factory=GateConfig, description="The release gate (`medtune gate`, eval.gate).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only")
        return v

    @model_validator(mode="after")
    def _rules(self) -> Recipe:
        """The rules between keys (recipe_rules.RULES), once every key is valid alone."""
        check_rules(self)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name or 'run'}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _set_dotted(tree: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise MedtuneError(f"cannot set '{key}': '{part}' is not a section", file=source)
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str], source: str = "command line") -> dict:
    """`a.b=value` strings → nested dict; values are parsed as YAML scalars/lists (`true`, `16`, `[q_proj, v_proj]`),
    except for text fields, which take the text as written (`tokenizer.system_prompt=Answer: briefly`)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MedtuneError(f"override '{item}' is not key=value", file=source)
        if is_text_key(Recipe, key.strip()):
            value = None if raw in ("null", "~") else raw
        else:
            value = load_yaml(raw, source, key.strip(), syntax_errors=False) if raw != "" else ""
        _set_dotted(tree, key.strip(), value, source)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _has_path(tree: Any, loc: tuple) -> bool:
    for part in loc:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and isinstance(part, int) and part < len(tree):
            tree = tree[part]
        else:
            return False
    return True


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 200, 200, 4


def _explain(err: ValidationError, source: str, overrides: dict | None = None,
             override_source: str = "command line") -> MedtuneError:
    first = err.errors()[0]
    rule = first.get("ctx", {}).get("error")
    if isinstance(rule, RuleBroken):  # keys valid alone, not together: blame the command line if it set one
        if overrides and any(_has_path(overrides, tuple(k.split("."))) for k in rule.keys):
            source = override_source
        return MedtuneError(rule.reason, file=source, field=rule.field)
    key = ".".join(str(p) for p in first["loc"])
    if overrides and _has_path(overrides, first["loc"]):
        source = override_source  # the mistake is in a key=value override, not in the file
    if first["type"] == "extra_forbidden":
        meant = suggest_key(Recipe, key)
        hint = f"did you mean {meant}?" if meant else "see `medtune train --help` for the keys"
        return MedtuneError(f"unknown recipe key '{key}' ({hint})", file=source, field=key)
    got = _SHORT.repr(first.get("input"))  # shortened: a value may be huge
    return MedtuneError(f"{first['msg']} (got {got})", file=source, field=key)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (or start from defaults when path is None), apply overrides, validate."""
    tree: dict = {}
    source = "defaults"
    override_source = "command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise MedtuneError("recipe file not found", file=source)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise MedtuneError(f"not valid YAML: {str(e).splitlines()[0]}", file=source) from None
        tree = load_yaml(text, source) or {}
        if not isinstance(tree, dict):
            raise MedtuneError("a recipe is a mapping of keys to values", file=source)
        tree.setdefault("name", path.stem)
        override_source = f"{source} (command line)"
    override_tree = parse_overrides(overrides, source=override_source) if overrides else {}
    if path is not None:
        _name_after_data(tree, override_tree)
    tree = _merge(tree, override_tree)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, source, override_tree, override_source) from None


def _name_after_data(tree: dict, override_tree: dict) -> None:
    """A recipe run on another data file (data.path=... on the command line, no name=) is named
    <recipe name>-<data file stem>, so its folder says what was trained: runs/quickstart-notes, not quickstart-2."""
    data, own = override_tree.get("data"), tree.get("data")
    new_path = data.get("path") if isinstance(data, dict) else None
    own_path = own.get("path") if isinstance(own, dict) else None
    if not isinstance(new_path, str) or new_path == own_path or "name" in override_tree \
            or not isinstance(tree.get("name"), str):
        return
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(new_path.removeprefix("demo:")).stem).strip("-._")
    if stem and stem != tree["name"]:
        tree["name"] = f"{tree['name']}-{stem}"


def recipe_help() -> str:
    """Every recipe key with its type, default and description: the help text of `medtune train`."""
    return keys_help(Recipe)

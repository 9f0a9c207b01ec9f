"""A run directory as one object: `Run` creates, locks and resumes it (medtune train), reads it (meta, recipe,
metrics, samples, system prompt), validates it, and loads "base + adapter" for every command that answers with a
run (generate, chat, eval, gate, merge, export, serve, ui).

Every file it touches is named in run/layout.py; the meta file is a typed RunMeta (run/meta.py); the lock is
run/lock.py's RunLock. Loading happens here only: `Run.load` (the base as the run trained on it, the run's
tokenizer, the adapter on top) and `Run.attach` (one more adapter onto a loaded base, for `medtune serve`).
"""

from __future__ import annotations

import json
import logging
from functools import cached_property
from pathlib import Path

import torch
import yaml

from medtune.errors import MedtuneError
from medtune.models import load_base_model, load_tokenizer
from medtune.recipe import QuantConfig, Recipe, load_recipe
from medtune.run.adapter import check_adapter
from medtune.run.layout import (
    ADAPTER_FILES,
    CHECKPOINTS,
    DATA_REPORT,
    META,
    METRICS_FINAL,
    RECIPE,
    SAMPLES,
    TRAINER_STATE,
    is_step_name,
)
from medtune.run.lock import RunLock, holder, is_locked
from medtune.run.meta import RunMeta, hardware, is_run_dir, read_run_meta, versions
from medtune.run.metrics import read_metrics
from medtune.tokenizer import ChatSetup

log = logging.getLogger("medtune")


class Run:
    """The run directory at `path` (nothing is read until asked)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ---- create, lock, resume (medtune train) ------------------------------------------------------------------

    @classmethod
    def create(cls, recipe: Recipe) -> Run:
        """The run directory for `recipe`: runs/<name> (or output_dir), or runs/<name>-2, -3 … so an earlier run is
        never overwritten. A locked directory, or an output_dir that already holds a run (without resume=true),
        is an error. Nothing is written: `lock` creates the folder."""
        run_dir = recipe.run_dir
        if is_locked(run_dir):
            raise MedtuneError(f"another training is using this run directory ({holder(run_dir)})",
                               file=str(run_dir))
        if recipe.resume or not run_dir.exists() or not any(run_dir.iterdir()):
            return cls(run_dir)
        if recipe.output_dir:
            raise MedtuneError("output_dir already holds a run; pass resume=true to continue it or choose another "
                               "output_dir", file=str(run_dir), field="output_dir")
        n = 2
        while (candidate := run_dir.with_name(f"{run_dir.name}-{n}")).exists():
            n += 1
        log.info("%s exists; writing this run to %s", run_dir, candidate)
        return cls(candidate)

    def lock(self) -> RunLock:
        """Create the run directory and take its lock (release it with `.release()`); a folder that cannot be
        written is one clear error."""
        try:
            return RunLock(self.path).acquire()
        except OSError as e:
            raise MedtuneError(f"cannot write the run directory: {e.strerror or e}; choose a writable output_dir",
                               file=str(self.path), field="output_dir") from None

    def save_files(self, recipe: Recipe, tok, chat: ChatSetup, model_dir: str, device: torch.device | None = None,
                   precision: str = "fp32") -> None:
        """Everything later commands need to reload the run exactly as trained: the tokenizer, a generation
        config that stops on the template's end-of-turn tokens, the resolved recipe and the meta file."""
        from transformers import GenerationConfig

        tok.save_pretrained(self.path)
        GenerationConfig(eos_token_id=chat.stop_token_ids, pad_token_id=chat.pad_token_id,
                         bos_token_id=tok.bos_token_id, max_new_tokens=256).save_pretrained(self.path)
        (self.path / RECIPE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
        RunMeta(base_model=recipe.model, base_model_path=str(Path(model_dir).resolve()), template=chat.template,
                stop_tokens=chat.stop_tokens, stop_token_ids=chat.stop_token_ids, pad_token=chat.pad_token,
                pad_token_id=chat.pad_token_id, max_length=recipe.data.max_length, quant=recipe.quant.model_dump(),
                trust_remote_code=recipe.trust_remote_code, versions=versions(),
                hardware=hardware(device or torch.device("cpu"), precision)).write(self.path)
        self.__dict__.pop("meta", None)  # a cached meta is stale now

    def write_data_report(self, report: dict) -> None:
        (self.path / DATA_REPORT).write_text(json.dumps(report, indent=2), encoding="utf-8")

    def write_final(self, metrics: dict[str, float], samples: list[dict]) -> None:
        """The run's final figures and its sample answers (base vs tuned)."""
        (self.path / METRICS_FINAL).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        (self.path / SAMPLES).write_text(json.dumps(samples, indent=2, ensure_ascii=False), encoding="utf-8")

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first; `*.tmp` (half-written) and `*.old` directories never count."""
        return sorted(p for p in (self.path / CHECKPOINTS).glob("*") if p.is_dir() and is_step_name(p.name)
                      and (p / TRAINER_STATE).is_file())

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint a resume starts from (the newest finished one), None before the first."""
        done = self.checkpoints()
        return done[-1] if done else None

    # ---- read ----------------------------------------------------------------------------------------------------

    @property
    def is_run(self) -> bool:
        """Does the folder hold a medtune run (its meta file)?"""
        return is_run_dir(self.path)

    @cached_property
    def meta(self) -> RunMeta:
        return read_run_meta(self.path)

    @property
    def recipe_path(self) -> Path:
        return self.path / RECIPE

    def recipe_tree(self) -> dict:
        """The saved recipe as plain YAML data ({} when the run has none)."""
        path = self.recipe_path
        return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}

    def recipe(self) -> Recipe:
        """The saved recipe, validated as `medtune train` would."""
        return load_recipe(self.recipe_path)

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the run trained with (recipe `tokenizer.system_prompt`), if any."""
        return (self.recipe_tree().get("tokenizer") or {}).get("system_prompt")

    def metrics(self) -> list[dict]:
        """Every row of metrics.jsonl, in the order logged."""
        return read_metrics(self.path)

    def final_metrics(self) -> dict[str, float]:
        path = self.path / METRICS_FINAL
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def samples(self) -> list[dict]:
        """The sample answers written at the end of training ([] when there are none)."""
        path = self.path / SAMPLES
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []

    def references(self) -> dict[str, str]:
        """{prompt: reference answer} of the held-out sample prompts (samples.json, `samples.from_eval`)."""
        if not self.is_run:
            return {}
        return {s["prompt"]: s["reference"] for s in self.samples() if s.get("reference")}

    def tokenizer(self):
        """The tokenizer saved with the run (its chat template, pad token and any token added in training)."""
        return load_tokenizer(str(self.path))

    # ---- validate ------------------------------------------------------------------------------------------------

    def validate(self, field: str | None = None) -> Run:
        """A run whose adapter can be loaded, or one MedtuneError naming the folder or the file at fault (`field`:
        the command-line option that named the run, when it was not the main argument)."""
        if not self.is_run:
            raise MedtuneError(f"not a medtune run directory (no {META})", file=str(self.path), field=field)
        missing = [name for name in ADAPTER_FILES if not (self.path / name).is_file()]
        if missing:
            raise MedtuneError(f"the run has no adapter ({' + '.join(ADAPTER_FILES)}); did training finish? A "
                               "checkpoint can be resumed with resume=true", file=str(self.path / missing[0]),
                               field=field)
        check_adapter(self.path)
        return self

    # ---- load ----------------------------------------------------------------------------------------------------

    def load(self, *, dtype: torch.dtype, device: torch.device, quantized: bool = True):
        """(base + this run's adapter, the run's tokenizer), in eval mode. The base loads as the run trained on it
        (4-bit for a QLoRA run) unless `quantized` is False (merge: the full-precision base); its embeddings grow
        to the run's tokenizer when training added a token (a pad token)."""
        self.validate()
        meta = self.meta
        if not Path(meta.base_model_path).is_dir():
            raise MedtuneError(f"the run's base model folder is gone: {meta.base_model_path}",
                               file=str(self.path / META), field="base_model_path")
        tok = self.tokenizer()
        base = load_base_model(meta.base_model_path, dtype=dtype, device=device,
                               quant=QuantConfig(**meta.quant) if quantized else None,
                               trust_remote_code=meta.trust_remote_code)
        if len(tok) > base.get_input_embeddings().num_embeddings:
            base.resize_token_embeddings(len(tok))
        model = self.attach(base)
        model.eval()
        return model, tok

    def attach(self, model, name: str = "default"):
        """`model` with this run's adapter added under `name`: a plain base becomes a PeftModel, a PeftModel gains
        one more adapter (peft's multi-adapter API). Call `validate` first."""
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model.load_adapter(str(self.path), adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, str(self.path), adapter_name=name)

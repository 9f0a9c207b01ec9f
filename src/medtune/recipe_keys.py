"""Recipe keys for people: the allowed values of choice fields, and the nearest key to a mistyped one.

Works on any tree of pydantic models (the recipe passes its root), so help text and error messages stay in step with
the fields themselves.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

# Names other fine-tuning tools (transformers, peft, trl, axolotl) use for a recipe key, by the last part of the key.
SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs", "steps": "max_steps",
    "gradient_accumulation_steps": "grad_accum", "gradient_accumulation": "grad_accum",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size", "scheduler": "lr_scheduler",
    "lr_scheduler_type": "lr_scheduler", "optim": "optimizer", "max_seq_length": "max_length",
    "sequence_len": "max_length", "max_seq_len": "max_length", "dataset": "path", "data_path": "path",
    "chat_template": "template", "system": "system_prompt", "bits": "load_in_4bit", "bf16": "precision",
    "fp16": "precision",
}


def choices(annotation: Any) -> list[str] | None:
    """The allowed values of a choice field (`Literal[...]`, optionally in `| None` or `list[...]`), else None.

    A field that also takes free values (`list[str] | Literal["all-linear"]`) has no closed set: None."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return [str(v) for v in typing.get_args(annotation)]
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(annotation) if a is not type(None)]
        found = [choices(a) for a in parts]
        if not found or any(f is None for f in found):
            return None
        return [v for f in found for v in f]
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return choices(item)
    return None


def _section(root: type[BaseModel], parts: list[str]) -> type[BaseModel] | None:
    model = root
    for part in parts:
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def all_keys(root: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the tree, sections included (`lora`, `lora.r`, ...)."""
    keys = []
    for name, field in root.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += all_keys(ann, f"{prefix}{name}.")
    return keys


def suggest_key(root: type[BaseModel], key: str) -> str | None:
    """The valid key a user most likely meant by the unknown `key` (`lora.rank` -> `lora.r`), or None."""
    *prefix, last = key.split(".")
    section = _section(root, prefix)
    siblings = list(section.model_fields) if section else []
    here = ".".join(prefix) + "." if prefix else ""
    everywhere = all_keys(root)
    meant = SYNONYMS.get(last.lower(), last.lower())
    if meant in siblings:
        return here + meant
    elsewhere = [k for k in everywhere if k.rsplit(".", 1)[-1] == meant]  # right name, wrong section
    if elsewhere:
        return elsewhere[0]
    close = difflib.get_close_matches(meant, siblings, n=1, cutoff=0.6)
    if close:
        return here + close[0]
    close = difflib.get_close_matches(key.lower(), everywhere, n=1, cutoff=0.75)
    if close:
        return close[0]
    abbreviated = [s for s in siblings if len(s) < len(meant) and meant.startswith(s)]
    return here + abbreviated[0] if len(abbreviated) == 1 else None


def is_text_key(root: type[BaseModel], key: str) -> bool:
    """Is the dotted key a text field (str or str | None)? Its command-line value is then taken verbatim."""
    *prefix, last = key.split(".")
    section = _section(root, prefix)
    field = section.model_fields.get(last) if section else None
    return field is not None and field.annotation in (str, str | None)


def keys_help(root: type[BaseModel], prefix: str = "") -> str:
    """Every key of the tree with its default, description and allowed values (`medtune train --help`)."""
    lines = []
    for name, field in root.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(keys_help(ann, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        allowed = choices(ann)
        one_of = f" One of: {', '.join(allowed)}." if allowed else ""
        lines.append(f"  {prefix}{name} = {default!r}\n      {field.description or ''}{one_of}")
    return "\n".join(lines)

"""Rows → examples: either a chat (list of {role, content}) or, for format=text, one pre-formatted string.

Each format reads canonical fields, which `data.columns` can map to the file's own column names:
  text         text
  messages     messages (OpenAI {role, content}; ShareGPT `conversations` with {from, value} also accepted)
  instruction  instruction, input (optional), output
  qa           question, answer
  template     any columns, through data.prompt_template / data.response_template (Jinja)
  preference   prompt, chosen, rejected: strings, or chat-turn lists (TRL's conversational form: prompt turns
               ending with the user, chosen/rejected [{role: assistant, ...}]; without a prompt column, chosen
               and rejected are whole conversations ending with the answer)
  feedback     prompt, completion, label: one answer and a reviewer's verdict on it (KTO). prompt and completion
               as in preference (TRL's unpaired form); label true/false, also yes/no, up/down (thumbs), 1/0, as a
               boolean, a number or text in any case
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError, UndefinedError

from medtune.data import guard, template_guard
from medtune.data.readers import Row
from medtune.errors import MedtuneError
from medtune.recipe import DataConfig

ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
                "chatgpt": "assistant", "model": "assistant", "system": "system"}


@dataclass
class Example:
    source: str
    row: int
    messages: list[dict[str, str]] | None = None  # chat formats
    text: str | None = None  # format=text
    label: bool | None = None  # format=feedback: the reviewer's verdict on the answer (True = desirable)


class RowError(MedtuneError):
    pass


def _bad(row: Row, field: str, message: str, kind: str) -> RowError:
    return RowError(message, file=row.source, row=row.number, field=field, kind=kind)


def _column(row: Row, cfg: DataConfig, name: str, required: bool = True) -> Any:
    col = cfg.columns.get(name, name)
    if col not in row.data:
        if not required:
            return None
        raise _bad(row, col, f"missing column (row has: {', '.join(map(str, row.data)) or 'nothing'})", "missing column")
    return row.data[col]


_FLOAT_NAMES = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_SHORT_VALUE = reprlib.Repr()
_SHORT_VALUE.maxstring, _SHORT_VALUE.maxother = 40, 40


def _text(row: Row, cfg: DataConfig, name: str, required: bool = True) -> str:
    value = _column(row, cfg, name, required)
    col = cfg.columns.get(name, name)
    if value is None:
        if required:
            raise _bad(row, col, "empty value", "empty")
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(row, col, f"expected text, got {_FLOAT_NAMES[str(value)]} (not a finite number: a missing value?)",
                   "empty")
    if not isinstance(value, str):
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        else:
            raise _bad(row, col, f"expected text, got {type(value).__name__}", "wrong type")
    if required and not value.strip():
        raise _bad(row, col, "empty text", "empty")
    return value


def _messages(row: Row, cfg: DataConfig, canonical: str = "messages", check_order: bool = True) -> list[dict[str, str]]:
    name = cfg.columns.get(canonical, canonical)
    if name not in row.data and canonical not in cfg.columns and canonical == "messages" and "conversations" in row.data:
        name = "conversations"  # ShareGPT
    if name not in row.data:
        raise _bad(row, name, f"missing column (row has: {', '.join(map(str, row.data))})", "missing column")
    turns = row.data[name]
    if isinstance(turns, str):  # CSV cells hold JSON text
        try:
            turns, check = guard.parse_json(turns, row.source, row.number, cfg.max_row_bytes)
            if check:
                guard.check_row({name: turns}, row.source, row.number, cfg.max_row_bytes)
        except json.JSONDecodeError:
            raise _bad(row, name, "expected a list of chat turns (JSON text in this cell is malformed)", "malformed") from None
    if not isinstance(turns, list) or not turns:
        raise _bad(row, name, "expected a non-empty list of chat turns", "empty")
    out = []
    for i, turn in enumerate(turns):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise _bad(row, where, "each turn must be an object with role and content", "malformed")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise _bad(row, f"{where}.role", f"unknown role {role!r} (use system, user or assistant)", "unknown role")
        if not isinstance(content, str) or not content.strip():
            raise _bad(row, f"{where}.content", "empty content", "empty")
        out.append({"role": ROLE_ALIASES[role.lower()], "content": content})
    if check_order:
        check_turn_order(out, row, name)
    return out


def _turns_or_text(row: Row, cfg: DataConfig, name: str, role: str) -> list[dict[str, str]]:
    """A preference column as chat turns: a list of turns as given, a string as one turn of `role`."""
    value = _column(row, cfg, name)
    if isinstance(value, list) or (isinstance(value, str) and value.lstrip().startswith("[{")):
        return _messages(row, cfg, name, check_order=False)
    return [{"role": role, "content": _text(row, cfg, name).strip()}]


def _prompt_turns(row: Row, cfg: DataConfig) -> list[dict[str, str]]:
    """The prompt column as chat turns; no prompt column: [] (the answers are then whole conversations)."""
    has_prompt = cfg.columns.get("prompt", "prompt") in row.data
    return _turns_or_text(row, cfg, "prompt", "user") if has_prompt else []


def _answered(prompt: list[dict[str, str]], row: Row, cfg: DataConfig, name: str,
              system_prompt: str | None) -> list[dict[str, str]]:
    """The prompt turns followed by the answer column `name`, with the system prompt, in a checked turn order."""
    messages = prompt + _turns_or_text(row, cfg, name, "assistant")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    check_turn_order(messages, row, cfg.columns.get(name, name))
    return messages


def to_pair(row: Row, cfg: DataConfig, system_prompt: str | None = None) -> tuple[Example, Example]:
    """format=preference: (prompt + chosen, prompt + rejected) as two conversations ending with the answer."""
    prompt = _prompt_turns(row, cfg)
    chosen, rejected = (_answered(prompt, row, cfg, name, system_prompt) for name in ("chosen", "rejected"))
    return Example(row.source, row.number, messages=chosen), Example(row.source, row.number, messages=rejected)


LABEL_WORDS = {"true": True, "yes": True, "up": True, "1": True, "false": False, "no": False, "down": False, "0": False}


def _label(row: Row, cfg: DataConfig) -> bool:
    """format=feedback's verdict: a boolean, 1/0, or one of LABEL_WORDS in any case."""
    value = _column(row, cfg, "label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise _bad(row, cfg.columns.get("label", "label"), f"expected true or false (also yes/no, up/down, 1/0), got "
               f"{_SHORT_VALUE.repr(value)}", "bad label")


def to_feedback(row: Row, cfg: DataConfig, system_prompt: str | None = None) -> Example:
    """format=feedback: prompt + completion as one conversation ending with the answer, and its label."""
    messages = _answered(_prompt_turns(row, cfg), row, cfg, "completion", system_prompt)
    return Example(row.source, row.number, messages=messages, label=_label(row, cfg))


def check_turn_order(messages: list[dict[str, str]], row: Row, field: str) -> None:
    """system? then user, assistant, user, assistant, …, ending with the assistant (there must be something to learn)."""
    start = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise _bad(row, f"{field}[{i}].role", f"turns out of order: expected {expected}, got {m['role']}", "turn order")
    if messages[-1]["role"] != "assistant":
        raise _bad(row, f"{field}[{len(messages) - 1}].role", "the last turn must be the assistant's answer", "turn order")


_environment = lru_cache(maxsize=4)(template_guard.environment)  # one bounded sandbox per output limit


def _render(template: str, row: Row, field: str, limit: int) -> str:
    values = {k: ("" if v is None else v) for k, v in row.data.items()}
    try:
        columns = {k: v for k, v in values.items() if str(k).isidentifier() and k != "row"}
        out = _environment(limit).render(template, columns, row=values)  # `row` is always the whole row
    except UndefinedError as e:
        raise _bad(row, field, f"template uses a column this row lacks: {e.message}", "missing column") from None
    except TemplateSyntaxError as e:
        raise MedtuneError(f"template does not parse: {e}", field=field) from None
    except (TemplateError, ArithmeticError, TypeError, ValueError) as e:  # limits, raise_exception, 1/0, ...
        raise _bad(row, field, f"template failed on this row: {e}", "template error") from None
    if not out.strip():
        raise _bad(row, field, "template renders to empty text for this row", "empty")
    return out.strip()


def to_example(row: Row, cfg: DataConfig, system_prompt: str | None = None) -> Example:
    fmt = cfg.format
    if fmt == "feedback":
        return to_feedback(row, cfg, system_prompt)
    if fmt == "text":
        return Example(row.source, row.number, text=_text(row, cfg, "text"))
    if fmt == "messages":
        messages = _messages(row, cfg)
    elif fmt == "instruction":
        instruction, extra = _text(row, cfg, "instruction"), _text(row, cfg, "input", required=False).strip()
        prompt = f"{instruction.strip()}\n\n{extra}" if extra else instruction.strip()
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, cfg, "output").strip()}]
    elif fmt == "qa":
        messages = [{"role": "user", "content": _text(row, cfg, "question").strip()},
                    {"role": "assistant", "content": _text(row, cfg, "answer").strip()}]
    elif fmt == "template":
        if not cfg.prompt_template or not cfg.response_template:
            raise MedtuneError("format=template needs data.prompt_template and data.response_template",
                               field="data.prompt_template")
        limit = cfg.max_row_bytes
        messages = [{"role": "user", "content": _render(cfg.prompt_template, row, "data.prompt_template", limit)},
                    {"role": "assistant", "content": _render(cfg.response_template, row, "data.response_template",
                                                             limit)}]
    else:  # pydantic already restricts data.format; preference rows go through to_pair
        raise MedtuneError(f"data format '{fmt}' does not make one conversation per row", field="data.format")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return Example(row.source, row.number, messages=messages)

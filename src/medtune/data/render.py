"""Examples → token ids and labels (labels = -100 where no loss falls), through the run's chat template.

Which tokens carry loss: with `train_on_prompt: false` (the default) only the assistant's answers and their
end-of-turn token. Templates with `{% generation %}` markers (our chatml and llama2) get their mask from
transformers' `return_assistant_tokens_mask`. A model's own template without markers (e.g. SmolLM2's) gets
it by rendering each conversation prefix and marking the characters each answer adds — which needs a
template whose renderings of a conversation's prefixes are prefixes of the full rendering (we check).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jinja2 import TemplateError

from medtune.data.formats import Example
from medtune.errors import MedtuneError
from medtune.recipe import DataConfig

IGNORE = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_JINJA_COMMENT = re.compile(r"\{#.*?#\}", re.S)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE where no loss
    source: str
    row: int

    @property
    def num_loss_tokens(self) -> int:
        # A label on the first token is never predicted (nothing precedes it), so it never counts.
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class Pair:
    """One preference row: the same prompt with its chosen and its rejected answer, loss only on the answers."""

    chosen: Sample
    rejected: Sample

    @property
    def length(self) -> int:  # what batching plans with: both halves are padded to the longer one
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


@dataclass
class Feedback:
    """One feedback row (KTO): a prompt and one answer, loss only on the answer, and the reviewer's verdict."""

    sample: Sample
    label: bool  # True: desirable (thumbs up), False: undesirable

    @property
    def length(self) -> int:  # what batching plans with
        return len(self.sample.input_ids)


class Dropped(Exception):
    """A row skipped on purpose (counted by reason in the data report)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION_TAG.search(_JINJA_COMMENT.sub("", template or "")))


def _answer_char_spans(tok, messages: list[dict], stop_tokens: list[str], ex: Example) -> tuple[str, list[tuple[int, int]]]:
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise MedtuneError("the chat template renders a conversation's prefix differently from the whole, so "
                               "answers cannot be located; set tokenizer.template=chatml or llama2, or add "
                               "{% generation %} markers to it", file=ex.source, row=ex.row, field="tokenizer.template")
        added = upto[len(before):]
        # The answer ends with its end-of-turn token; what the template writes after it (a newline) is not learned.
        ends = [added.rfind(s) + len(s) for s in stop_tokens if s and s in added]
        spans.append((len(before), len(before) + (max(ends) if ends else len(added.rstrip()))))
    return full, spans


def _chat_ids_and_mask(tok, messages, stop_tokens, ex: Example) -> tuple[list[int], list[int]]:
    if has_generation_markers(tok.chat_template):
        enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), list(enc["assistant_masks"])
    full, spans = _answer_char_spans(tok, messages, stop_tokens, ex)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _last_run(mask: list[int]) -> list[int]:
    """Only the last run of 1s: the final assistant answer (earlier answers of a multi-turn prompt are context)."""
    start = next(i for i in range(len(mask) - 1, -1, -1) if mask[i] and (i == 0 or not mask[i - 1]))
    return [0] * start + mask[start:]


def render(ex: Example, tok, cfg: DataConfig, stop_tokens: list[str], last_answer_only: bool = False) -> tuple[Sample, bool]:
    """Returns (sample, truncated). Raises Dropped for rows skipped by policy, MedtuneError for user errors.
    `last_answer_only`: loss only on the final assistant answer (preference and feedback completions)."""
    if ex.text is not None:
        starts_with_bos = tok.bos_token is not None and ex.text.startswith(tok.bos_token)
        ids = tok(ex.text, add_special_tokens=not starts_with_bos)["input_ids"]
        if cfg.add_eos and tok.eos_token_id is not None and ids[-1] != tok.eos_token_id:
            ids.append(tok.eos_token_id)
        mask = [1] * len(ids)
        field = cfg.columns.get("text", "text")
    else:
        try:
            ids, mask = _chat_ids_and_mask(tok, ex.messages, stop_tokens, ex)
        except TemplateError as e:  # e.g. its raise_exception('roles must alternate') on this conversation
            raise MedtuneError(f"the chat template fails on this row: {e}", file=ex.source, row=ex.row,
                               field="tokenizer.template") from None
        if cfg.train_on_prompt:
            mask = [1] * len(ids)
        elif last_answer_only and any(mask):
            mask = _last_run(mask)
        field = cfg.columns.get("messages", "messages") if cfg.format == "messages" else "prompt"
    labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    if not any(m for m in mask[1:]):
        raise Dropped("nothing left to learn after masking")
    truncated = False
    if len(ids) > cfg.max_length:
        if cfg.overlong == "drop":
            raise Dropped("longer than max_length")
        first_label = next(i for i, m in enumerate(mask) if m and i > 0)
        if cfg.overlong == "error" or first_label >= cfg.max_length:
            what = "example" if cfg.overlong == "error" else "prompt"
            n = len(ids) if cfg.overlong == "error" else first_label
            raise MedtuneError(f"{what} is {n} tokens, longer than data.max_length={cfg.max_length} (raise "
                               "data.max_length, or set data.overlong=drop to skip such rows)",
                               file=ex.source, row=ex.row, field=field, kind="too long")
        ids, labels, truncated = ids[: cfg.max_length], labels[: cfg.max_length], True
    return Sample(ids, labels, ex.source, ex.row), truncated

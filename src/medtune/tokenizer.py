"""The one place where the chat template, the stop tokens and the pad token are decided.

Training, generation, serving and export all read the tokenizer saved in the run directory, so they cannot
disagree. Two traps are closed here: a pad token equal to the end-of-turn token (tuned models then never
stop), and ChatML models that must stop on `<|im_end|>` rather than on the tokenizer's eos.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from jinja2 import TemplateError, TemplateSyntaxError

from medtune.errors import MedtuneError
from medtune.recipe import TokenizerConfig

log = logging.getLogger("medtune")

SHIPPED_TEMPLATES = ("chatml", "llama2")
# Tokens that end a turn in common templates, checked in the template's text.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>")
# Pad candidates, most specific first; the first in the vocabulary that is not a stop token wins.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>", "<unk>", "<|reserved_special_token_0|>")


@dataclass
class ChatSetup:
    """What the run saves about prompting, so every later command behaves the same."""

    template: str  # "chatml", "llama2", "tokenizer" (the model's own) or a file path
    stop_tokens: list[str]
    stop_token_ids: list[int]
    pad_token: str
    pad_token_id: int
    added_tokens: int = 0  # new tokens added to the vocabulary (embeddings must be resized)


# (marker in a template's text, the layout it belongs to), first match wins: names a tokenizer's own template
TEMPLATE_LAYOUTS = (("<|im_start|>", "ChatML"), ("<|start_header_id|>", "Llama 3"), ("[INST]", "Llama 2"),
                    ("<start_of_turn>", "Gemma"), ("<|user|>", "Zephyr / Phi-3"))


def template_layout(text: str) -> str | None:
    """The well-known layout a chat template writes (ChatML, Llama 3, Llama 2, ...), None when it is none of them."""
    return next((name for marker, name in TEMPLATE_LAYOUTS if marker in text), None)


def shipped_template(name: str) -> str:
    return resources.files("medtune.templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def _has_token(tok, token: str) -> bool:
    return token in tok.get_vocab()


def resolve_template(tok, choice: str) -> tuple[str, str]:
    """(name, jinja text) for `tokenizer.template`: auto, chatml, llama2 or a .jinja path."""
    if choice == "auto":
        if tok.chat_template:
            return "tokenizer", tok.chat_template
        choice = "chatml" if _has_token(tok, "<|im_start|>") else "llama2"
    if choice in SHIPPED_TEMPLATES:
        if choice == "chatml":
            for t in ("<|im_start|>", "<|im_end|>"):
                if not _has_token(tok, t):
                    raise MedtuneError(f"template chatml needs the token {t}, which this tokenizer lacks; "
                                       "use tokenizer.template=llama2 or auto", field="tokenizer.template")
        if choice == "llama2" and (tok.bos_token is None or tok.eos_token is None):
            raise MedtuneError("template llama2 needs bos and eos tokens", field="tokenizer.template")
        return choice, shipped_template(choice)
    path = Path(choice)
    if path.suffix == ".jinja" and path.is_file():
        return str(path), path.read_text(encoding="utf-8")
    raise MedtuneError(f"unknown template '{choice}': use auto, chatml, llama2 or a path to a .jinja file",
                       field="tokenizer.template")


def check_template(tok, name: str, system_prompt: str | None) -> None:
    """Render a one-exchange conversation with the template now set on `tok`, so that a template with a syntax error
    or one that refuses plain conversations (`raise_exception`) stops here, naming its file, not mid-training."""
    where = name if name not in (*SHIPPED_TEMPLATES, "tokenizer") else None
    trial = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hello."}]
    if system_prompt:
        trial.insert(0, {"role": "system", "content": system_prompt})
    try:
        tok.apply_chat_template(trial, tokenize=False)
    except TemplateSyntaxError as e:
        raise MedtuneError(f"chat template syntax error on line {e.lineno}: {e.message}", file=where,
                           field="tokenizer.template") from None
    except TemplateError as e:
        exchange = "system (tokenizer.system_prompt)/user/assistant" if system_prompt else "user/assistant"
        raise MedtuneError(f"chat template fails on a plain {exchange} exchange: {e}", file=where,
                           field="tokenizer.template") from None


def stop_tokens_for(tok, template_text: str) -> list[str]:
    found = [m for m in END_OF_TURN_MARKERS if m in template_text and _has_token(tok, m)]
    if tok.eos_token and tok.eos_token not in found:
        found.append(tok.eos_token)
    if not found:
        raise MedtuneError("the tokenizer has no end-of-sequence token, so a tuned model could never stop")
    return found


def choose_pad(tok, stop_tokens: list[str], choice: str) -> tuple[str, int]:
    """Returns (pad token, number of tokens added to the vocabulary)."""
    if choice == "eos":
        log.warning("tokenizer.pad_token=eos (as the seed notebooks do). medtune masks padding by position, so the "
                    "end of each answer still trains here, but tools that mask by token id will teach this model "
                    "never to stop. Prefer tokenizer.pad_token=auto.")
        return tok.eos_token, 0
    if choice != "auto":
        if not _has_token(tok, choice):
            raise MedtuneError(f"pad token {choice!r} is not in the vocabulary", field="tokenizer.pad_token")
        if choice in stop_tokens:
            log.warning("pad token %s is also a stop token; generation may end early on padding", choice)
        return choice, 0
    if tok.pad_token and tok.pad_token not in stop_tokens:
        return tok.pad_token, 0
    for cand in PAD_CANDIDATES:
        if _has_token(tok, cand) and cand not in stop_tokens:
            return cand, 0
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    return "<|pad|>", 1


def prepare_tokenizer(tok, cfg: TokenizerConfig) -> ChatSetup:
    """Set the template, pad token and padding side on `tok` (in place) and say what was chosen."""
    name, text = resolve_template(tok, cfg.template)
    tok.chat_template = text
    check_template(tok, name, cfg.system_prompt)
    stops = stop_tokens_for(tok, text)
    pad, added = choose_pad(tok, stops, cfg.pad_token)
    tok.pad_token = pad
    tok.padding_side = cfg.padding_side
    return ChatSetup(template=name, stop_tokens=stops, stop_token_ids=tok.convert_tokens_to_ids(stops),
                     pad_token=pad, pad_token_id=tok.convert_tokens_to_ids(pad), added_tokens=added)


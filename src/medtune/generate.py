"""Talking to a model: a base model name/folder, or a run directory (its base + its adapter).

A run directory carries its tokenizer (with the chat template used in training) and a generation config
whose eos ids are the template's end-of-turn tokens, so a tuned model stops where it learned to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from medtune.decode_weights import add_decode_copies, decode_copies_pay_off
from medtune.errors import MedtuneError
from medtune.gguf_model import GgufModel, load_gguf
from medtune.models import bf16_supported, load_base_model, load_tokenizer, pick_device, resolve_model
from medtune.recipe import TokenizerConfig
from medtune.run.run import Run
from medtune.tokenizer import prepare_tokenizer

# Repetition control of `generate` (samples at the end of training, generate, chat, compare, ui; not serve, which
# keeps OpenAI's semantics), over the answer's own tokens only. A small model's greedy answer otherwise loops on
# one sentence after a short fine-tune.
REPETITION_PENALTY = 1.2  # transformers' CTRL-style penalty on tokens already in the prompt or the answer
NO_REPEAT_NGRAM_SIZE = 4  # no 4-token sequence twice in one answer (0 = off)


@dataclass
class Loaded:
    model: torch.nn.Module
    tok: object
    stop_token_ids: list[int]
    pad_token_id: int
    name: str
    has_adapter: bool
    max_length: int
    autocast: torch.dtype | None

    def label(self, what: str, use_adapter: bool = True) -> str:
        """A progress bar's name that says which model runs: `perplexity (base)` / `(tuned)` for a run."""
        if not self.has_adapter:
            return what
        return f"{what} ({'tuned' if use_adapter else 'base'})"


def load_for_inference(model_or_run: str, *, device: str = "auto", precision: str = "auto",
                       template: str = "auto", max_length: int = 2048, for_decoding: bool = False) -> Loaded:
    """A .gguf file (llama.cpp, its own chat template), a run directory (its base + adapter, tokenizer, stops and
    max_length: `Run.load`) or a model name/folder (`template` decides its chat template). `for_decoding`
    (generate, chat, compare, ui): with precision auto on a CPU without fast bf16, one-token steps multiply by bf16
    copies of the weights (medtune.decode_weights); scoring (eval) keeps plain fp32."""
    if str(model_or_run).endswith(".gguf"):
        return load_gguf(model_or_run)
    dev = pick_device(device)
    fast_bf16 = bf16_supported(dev)
    use_bf16 = precision == "bf16" or (precision == "auto" and fast_bf16)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    autocast = torch.bfloat16 if use_bf16 else None
    run = Run(model_or_run)
    if run.is_run:
        model, tok = run.load(dtype=dtype, device=dev)
        meta = run.meta
        loaded = Loaded(model, tok, meta.stop_token_ids, meta.pad_token_id, str(model_or_run), True,
                        meta.max_length, autocast)
    else:
        path = resolve_model(model_or_run)
        tok = load_tokenizer(path)
        chat = prepare_tokenizer(tok, TokenizerConfig(template=template))
        model = load_base_model(path, dtype=dtype, device=dev)
        if chat.added_tokens:
            model.resize_token_embeddings(len(tok))
        model.eval()
        loaded = Loaded(model, tok, chat.stop_token_ids, chat.pad_token_id, model_or_run, False, max_length, autocast)
    if for_decoding and precision == "auto" and decode_copies_pay_off(dev, fast_bf16):
        add_decode_copies(loaded.model)
    return loaded


def prompt_ids(tok, messages: list[dict[str, str]], max_length: int) -> torch.Tensor:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    if len(ids) >= max_length:
        raise MedtuneError(f"prompt is {len(ids)} tokens, longer than max_length={max_length}", field="prompt")
    return torch.tensor([ids])


class _CallbackStreamer:
    """Decodes new tokens as they come and hands the new text to a callback (word-safe: holds back partial UTF-8)."""

    def __init__(self, tok, on_text: Callable[[str], None]):
        self.tok, self.on_text, self.ids, self.sent, self.skip_prompt = tok, on_text, [], 0, True

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt:  # generate() first hands over the prompt
            self.skip_prompt = False
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.on_text(text[self.sent:])
        self.sent = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.on_text(text[self.sent:])


@torch.inference_mode()
def generate(loaded: Loaded, messages: list[dict[str, str]], *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, use_adapter: bool = True, on_text: Callable[[str], None] | None = None,
             streamer=None, repetition_penalty: float = REPETITION_PENALTY,
             no_repeat_ngram_size: int = NO_REPEAT_NGRAM_SIZE) -> str:
    """One answer to a conversation; greedy when temperature is 0. Streams text pieces to `on_text`, or token ids
    to a transformers-style `streamer` (put/end; its first put is the prompt). `repetition_penalty` 1.0 and
    `no_repeat_ngram_size` 0 turn repetition control off (a .gguf model: llama.cpp's repeat penalty, no n-gram
    block)."""
    if isinstance(loaded.model, GgufModel):
        return loaded.model.answer(loaded.tok, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, repetition_penalty=repetition_penalty, on_text=on_text)
    ids = prompt_ids(loaded.tok, messages, loaded.max_length)
    device = next(loaded.model.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=loaded.stop_token_ids, pad_token_id=loaded.pad_token_id,
                  do_sample=temperature > 0, logits_processor=_repetition_control(ids.shape[1], repetition_penalty,
                                                                                   no_repeat_ngram_size))
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    adapter_off = loaded.model.disable_adapter() if (loaded.has_adapter and not use_adapter) else nullcontext()
    autocast = (torch.autocast(device.type, dtype=loaded.autocast) if loaded.autocast is not None else nullcontext())
    if streamer is None and on_text:
        streamer = _CallbackStreamer(loaded.tok, on_text)
    with adapter_off, autocast:
        out = loaded.model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                    streamer=streamer, **kwargs)
    return loaded.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


class _AnswerOnly:
    """A transformers logits processor that sees only the answer's tokens, not the prompt's: the question's own
    words (a term asked about, the chat template) are never penalised as repeats."""

    def __init__(self, processor, prompt_length: int):
        self.processor, self.prompt_length = processor, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.processor(input_ids[:, self.prompt_length:], scores)


def _repetition_control(prompt_length: int, penalty: float, ngram: int) -> list:
    from transformers import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    processors = [RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else []
    processors += [NoRepeatNGramLogitsProcessor(ngram)] if ngram > 0 else []
    return LogitsProcessorList(_AnswerOnly(p, prompt_length) for p in processors)


def user_turn(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

"""A `.gguf` file as `medtune generate` / `medtune chat` see a model: llama.cpp (llama-cpp-python, the optional
`medtune[gguf]` extra) runs it, with the chat template and end-of-generation tokens stored in the GGUF, so an
export is checked with llama.cpp itself before it goes to Ollama.

`load_gguf` returns a medtune.generate.Loaded whose `model` is a GgufModel and whose `tok` renders and counts
prompts with the GGUF's own template (enough for medtune.chat's context window); medtune.generate.generate hands
a GgufModel's conversations to `GgufModel.answer`, and `medtune serve` (medtune.serve.gguf_engine) drives
`GgufModel.tokens` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.export.quantize import require_llama_cpp


@dataclass
class GgufConfig:
    max_position_embeddings: int  # the context the GGUF was trained with (llama.cpp's n_ctx_train)


class GgufTokenizer:
    """The part of a transformers tokenizer medtune's chat uses: apply_chat_template over the GGUF's template."""

    def __init__(self, llm, template: str):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        vocab = llm._model  # eos/bos text for the template, as llama-cpp-python itself renders it
        eos = vocab.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
        bos = vocab.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text; a template's raise_exception() is a jinja2 TemplateError, as with transformers."""
        from jinja2 import TemplateError

        try:
            return self.formatter(messages=messages).prompt
        except ValueError as e:  # llama-cpp-python's raise_exception
            raise TemplateError(str(e)) from None

    def __call__(self, text: str) -> dict[str, list[int]]:
        """Plain text to ids as a transformers tokenizer's call does: the vocabulary's BOS if it wants one,
        special-token text parsed as special tokens."""
        return {"input_ids": self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)}

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True,
                            return_dict: bool = False, **_):
        text = self.render(messages)
        if not tokenize:
            return text
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return {"input_ids": ids} if return_dict else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")


class GgufModel:
    """A llama.cpp model; `answer` streams a reply to a conversation."""

    def __init__(self, llm):
        self.llm = llm
        self.config = GgufConfig(int(llm._model.n_ctx_train()))

    @cached_property
    def eog_ids(self) -> frozenset[int]:
        """The vocabulary's end-of-generation tokens, as llama.cpp lists them (eos, eot, <|im_end|>...)."""
        import llama_cpp

        vocab = self.llm._model.vocab
        return frozenset(t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t))

    def tokens(self, ids: list[int], *, temperature: float, top_p: float, repetition_penalty: float = 1.0,
               seed: int | None = None) -> Iterator[int]:
        """Endless next tokens after the prompt `ids` (the caller stops: at an eog_ids token, at its budget);
        greedy when temperature is 0, else seeded (`seed`) or random."""
        import llama_cpp

        self.llm.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed)  # DEFAULT: a random seed
        sampling = dict(temp=temperature, top_p=top_p if temperature > 0 else 1.0, top_k=0 if temperature > 0 else 1,
                        min_p=0.0, repeat_penalty=repetition_penalty)
        yield from self.llm.generate(ids, reset=True, **sampling)

    def answer(self, tok: GgufTokenizer, messages: list[dict[str, str]], *, max_new_tokens: int,
               temperature: float, top_p: float, repetition_penalty: float,
               on_text: Callable[[str], None] | None) -> str:
        """Greedy when temperature is 0; stops at an end-of-generation token of the GGUF's vocabulary."""
        ids = tok.apply_chat_template(messages)
        if len(ids) + max_new_tokens > self.llm.n_ctx():
            raise MedtuneError(f"prompt is {len(ids)} tokens; with {max_new_tokens} new ones it passes the "
                               f"context of {self.llm.n_ctx()}", field="prompt")
        out: list[int] = []
        sent = ""
        for token in self.tokens(ids, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty):
            if token in self.eog_ids or len(out) >= max_new_tokens:
                break
            out.append(token)
            text = tok.decode(out)
            if on_text and not text.endswith("\ufffd"):
                on_text(text[len(sent):])
                sent = text
        text = tok.decode(out)
        if on_text and len(text) > len(sent):
            on_text(text[len(sent):])
        return text.strip()


def load_gguf(path: str | Path, n_ctx: int = 4096):
    """A Loaded for a .gguf file: its own chat template (required) and end-of-generation tokens."""
    from medtune.generate import Loaded

    require_llama_cpp("running a .gguf file")
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise MedtuneError("GGUF file not found", file=str(path))
    try:
        probe = Llama(model_path=str(path), vocab_only=True, verbose=False)  # the trained context, cheaply
        meta = probe.metadata
        trained = int(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length", 0))
        llm = Llama(model_path=str(path), n_ctx=min(n_ctx, trained) if trained > 0 else n_ctx, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise MedtuneError(f"llama.cpp cannot load it: {e}", file=str(path)) from None
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise MedtuneError("the GGUF carries no chat template (tokenizer.chat_template)", file=str(path))
    model = GgufModel(llm)
    model.config = GgufConfig(llm.n_ctx())  # what this process can attend to
    return Loaded(model, GgufTokenizer(llm, template), sorted(model.eog_ids), llm.token_eos(), str(path), False,
                  llm.n_ctx(), None)

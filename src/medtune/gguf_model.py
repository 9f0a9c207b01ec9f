"""A `.gguf` file as `medtune generate` / `medtune chat` see a model: llama.cpp (llama-cpp-python, the optional
`medtune[gguf]` extra) runs it, with the chat template and end-of-generation tokens stored in the GGUF, so an
export is checked with llama.cpp itself before it goes to Ollama.

`load_gguf` returns a medtune.generate.Loaded whose `model` is a GgufModel and whose `tok` renders and counts
prompts with the GGUF's own template (enough for medtune.chat's context window); medtune.generate.generate hands
a GgufModel's conversations to `GgufModel.answer`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
        return self.formatter(messages=messages).prompt

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

    def answer(self, tok: GgufTokenizer, messages: list[dict[str, str]], *, max_new_tokens: int,
               temperature: float, top_p: float, repetition_penalty: float,
               on_text: Callable[[str], None] | None) -> str:
        """Greedy when temperature is 0; stops at an end-of-generation token of the GGUF's vocabulary."""
        import llama_cpp

        ids = tok.apply_chat_template(messages)
        if len(ids) + max_new_tokens > self.llm.n_ctx():
            raise MedtuneError(f"prompt is {len(ids)} tokens; with {max_new_tokens} new ones it passes the "
                               f"context of {self.llm.n_ctx()}", field="prompt")
        out: list[int] = []
        sent = ""
        sampling = dict(temp=temperature, top_p=top_p if temperature > 0 else 1.0, top_k=0 if temperature > 0 else 1,
                        min_p=0.0, repeat_penalty=repetition_penalty)
        for token in self.llm.generate(ids, reset=True, **sampling):
            if llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token) or len(out) >= max_new_tokens:
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
    return Loaded(model, GgufTokenizer(llm, template), [llm.token_eos()], llm.token_eos(), str(path), False,
                  llm.n_ctx(), None)

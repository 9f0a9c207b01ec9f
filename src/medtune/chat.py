"""`medtune chat`: a terminal conversation that lasts.

The model sees as much of the conversation as its context holds: the model config's `max_position_embeddings`
less the answer's `max_new_tokens` (a run's `data.max_length` is the training length, not the model's limit).
When the conversation grows past that, the oldest user/assistant exchanges are left out of what the model sees
(the system prompt always stays) and a note says so; the whole conversation stays in memory (`/save FILE`).
Ctrl-C during an answer stops it and returns to the prompt (the partial answer is kept); Ctrl-C at an empty prompt
twice in a row, Ctrl-D, or /exit ends the chat.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import medtune.generate as gen
from medtune.errors import MedtuneError

HELP = "/reset clears the conversation, /save FILE writes it as JSON, /exit quits (or Ctrl-D); Ctrl-C stops an answer."


def model_context(loaded: gen.Loaded) -> int:
    """Tokens the model can attend to: its config's max_position_embeddings (else the loaded max_length)."""
    config = getattr(loaded.model, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else loaded.max_length


def prompt_length(tok, messages: list[dict[str, str]]) -> int:
    return len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"])


def fit_window(tok, history: list[dict[str, str]], budget: int) -> tuple[list[dict[str, str]], int] | None:
    """(the messages the model sees, how many earlier messages were left out) so that the prompt is at most
    `budget` tokens: the system message, then the newest turns, dropping whole exchanges from the oldest.
    None when even the system message and the last user message do not fit."""
    head = history[:1] if history and history[0]["role"] == "system" else []
    turns = history[len(head):]
    dropped = 0
    while turns:
        window = head + turns
        if prompt_length(tok, window) <= budget:
            return window, dropped
        if len(turns) == 1:
            return None
        # Drop the oldest exchange (a user message and the answer after it): the window still opens with a user.
        cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
        turns, dropped = turns[cut:], dropped + cut
    return None


@dataclass
class ChatSession:
    """One conversation: the full history, and what the model is shown of it."""

    loaded: gen.Loaded
    system: str | None = None
    max_new_tokens: int = 256
    generate_kw: dict = field(default_factory=dict)
    out: Callable[[str], None] = lambda text: print(text, end="", flush=True)
    history: list[dict[str, str]] = field(default_factory=list)
    dropped: int = 0  # messages left out of the model's view at the last answer

    def __post_init__(self) -> None:
        context = model_context(self.loaded)
        self.budget = context - self.max_new_tokens
        if self.budget < 8:
            raise MedtuneError(f"--max-new-tokens {self.max_new_tokens} leaves no room for the conversation in the "
                               f"model's context of {context} tokens", field="--max-new-tokens")
        # generate() checks the prompt against loaded.max_length: the chat's limit is the model's context.
        self.loaded = dataclasses.replace(self.loaded, max_length=context)
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.dropped = 0

    def ask(self, text: str) -> str | None:
        """The model's answer to `text` (streamed to `out`), added to the history; None when the message alone is
        too long. Ctrl-C stops the answer: what was streamed so far is kept."""
        self.history.append({"role": "user", "content": text})
        fitted = fit_window(self.loaded.tok, self.history, self.budget)
        if fitted is None:
            self.history.pop()
            self.out(f"(that message is too long for the model's context of {self.budget + self.max_new_tokens} "
                     f"tokens with {self.max_new_tokens} kept for the answer; shorten it or lower "
                     "--max-new-tokens)\n")
            return None
        window, dropped = fitted
        if dropped > self.dropped:
            self.out(f"(note: the conversation is longer than the model's context; the oldest {dropped} messages "
                     "are left out of what the model sees - /reset starts afresh)\n")
        self.dropped = dropped
        pieces: list[str] = []

        def stream(piece: str) -> None:
            pieces.append(piece)
            self.out(piece)

        self.out("model> ")
        try:
            answer = gen.generate(self.loaded, window, max_new_tokens=self.max_new_tokens, on_text=stream,
                                  **self.generate_kw)
        except KeyboardInterrupt:
            answer = "".join(pieces).strip()
            self.out("\n(stopped)")
        except MedtuneError:
            self.history.pop()  # the failed turn leaves the conversation as it was
            raise
        self.out("\n")
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def save(self, path: str) -> None:
        target = Path(path).expanduser()
        try:
            target.write_text(json.dumps(self.history, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise MedtuneError(f"cannot write the conversation: {e.strerror}", file=str(target)) from None
        self.out(f"(conversation saved to {target})\n")


def run_chat(session: ChatSession, read: Callable[[str], str] | None = None) -> int:
    """The read-answer loop. Exits 0 on /exit, Ctrl-D, or Ctrl-C twice at the prompt."""
    read = read or input  # looked up now: tests replace builtins.input
    interrupted = False
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            session.out("\n")
            return 0
        except KeyboardInterrupt:
            if interrupted:
                session.out("\n")
                return 0
            interrupted = True
            session.out("\n(Ctrl-C again or Ctrl-D to exit)\n")
            continue
        interrupted = False
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            session.out("(conversation cleared)\n")
        elif line.startswith("/save"):
            try:
                session.save(line[len("/save"):].strip() or "chat.json")
            except MedtuneError as e:
                session.out(f"medtune: error: {e}\n")
        elif line == "/help":
            session.out(HELP + "\n")
        elif line:
            try:
                session.ask(line)
            except MedtuneError as e:  # never lose the conversation over one failed answer
                session.out(f"\nmedtune: error: {e}\n")

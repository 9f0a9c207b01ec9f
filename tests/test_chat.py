"""`medtune chat` (medtune.chat): a conversation longer than the model's context, Ctrl-C during an answer and at
the prompt, and a real `medtune chat` subprocess stopped with SIGINT mid-answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import medtune.generate as gen
from medtune.chat import ChatSession, fit_window, model_context, prompt_length, run_chat
from medtune.generate import load_for_inference

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Answer briefly."
# ~60 tokens each on the tiny tokenizer: 20 of them (plus answers) are far more than the tiny model's 1024.
LONG = ("The patient reports fever and cough for three days, has no other complaints, drinks plenty of water and "
        "asks whether {n} days of rest are enough before seeing a doctor about the cough.")


@pytest.fixture(scope="module")
def loaded(tiny_run_dir):
    return load_for_inference(str(tiny_run_dir), device="cpu")


class Script:
    """Scripted stdin for run_chat: lines, or exceptions (KeyboardInterrupt, EOFError) to raise in their place."""

    def __init__(self, items):
        self.items, self.asked = list(items), 0

    def __call__(self, prompt: str = "") -> str:
        self.asked += 1
        item = self.items.pop(0) if self.items else EOFError()
        if isinstance(item, BaseException):
            raise item
        return item


def test_context_is_the_models_not_the_training_length(loaded):
    # The run trained with data.max_length=96; the tiny LLaMA's config allows 1024 positions.
    assert loaded.max_length == 96
    assert model_context(loaded) == 1024
    session = ChatSession(loaded, max_new_tokens=24, out=lambda t: None)
    assert session.budget == 1000 and session.loaded.max_length == 1024


def test_fit_window_drops_oldest_exchanges_and_keeps_the_system_prompt(loaded):
    tok = loaded.tok
    history = [{"role": "system", "content": SYSTEM}]
    for n in range(5):
        history += [{"role": "user", "content": LONG.format(n=n)}, {"role": "assistant", "content": f"Rest {n}."}]
    history.append({"role": "user", "content": "And now?"})
    everything = prompt_length(tok, history)
    assert fit_window(tok, history, everything) == (history, 0)
    # Room for the system prompt, the last two exchanges and the new question: the three oldest exchanges go.
    keep = [history[0], *history[7:]]
    window, dropped = fit_window(tok, history, prompt_length(tok, keep))
    assert (window, dropped) == (keep, 6)
    # One token less and one more exchange goes.
    assert fit_window(tok, history, prompt_length(tok, keep) - 1) == ([history[0], *history[9:]], 8)
    # Not even the system prompt and the new question fit: None.
    assert fit_window(tok, history, prompt_length(tok, [history[0], history[-1]]) - 1) is None


def test_twenty_turn_conversation_survives(loaded, monkeypatch):
    """The bug: the 4th turn of a chat with a run trained at max_length=96/256 ended the program. Now 20 long turns
    all get an answer; each prompt fits the model's context; the system prompt is always in it."""
    windows, printed = [], []
    real = gen.generate

    def spy(ld, messages, **kw):
        windows.append(list(messages))
        return real(ld, messages, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    session = ChatSession(loaded, system=SYSTEM, max_new_tokens=40, generate_kw={"temperature": 0.0},
                          out=printed.append)
    script = Script([LONG.format(n=n) for n in range(20)] + ["/exit"])
    torch.manual_seed(0)
    assert run_chat(session, read=script) == 0
    assert script.asked == 21 and len(windows) == 20
    assert len(session.history) == 1 + 40  # the whole conversation is kept
    assert [m["role"] for m in session.history[1:]] == ["user", "assistant"] * 20
    for window in windows:
        assert window[0] == {"role": "system", "content": SYSTEM} and window[1]["role"] == "user"
        assert prompt_length(loaded.tok, window) <= 1024 - 40
    assert windows[-1][-1]["content"] == LONG.format(n=19)
    assert len(windows[-1]) < len(session.history) - 1  # older turns were left out ...
    notes = [p for p in "".join(printed).splitlines() if p.startswith("(note: the conversation is longer")]
    assert notes  # ... and the user was told
    assert "error" not in "".join(printed)


def test_too_long_message_is_refused_without_losing_the_conversation(loaded):
    printed = []
    session = ChatSession(loaded, system=SYSTEM, max_new_tokens=1000, out=printed.append)
    session.history += [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    before = list(session.history)
    assert session.ask(" ".join([LONG.format(n=1)] * 3)) is None
    assert session.history == before
    assert "that message is too long for the model's context of 1024 tokens" in "".join(printed)


def test_ctrl_c_stops_the_answer_and_keeps_the_partial_text(loaded, monkeypatch):
    def interrupted(ld, messages, *, on_text, **kw):
        on_text("Rest and ")
        raise KeyboardInterrupt

    printed = []
    monkeypatch.setattr(gen, "generate", interrupted)
    session = ChatSession(loaded, out=printed.append)
    script = Script(["fever?", KeyboardInterrupt(), "/reset", KeyboardInterrupt(), KeyboardInterrupt(), "never read"])
    assert run_chat(session, read=script) == 0
    text = "".join(printed)
    assert "model> Rest and \n(stopped)\n" in text
    assert text.count("(Ctrl-C again or Ctrl-D to exit)") == 2  # the /reset between them re-arms the first Ctrl-C
    assert script.items == ["never read"]
    assert session.history == []  # /reset cleared it


def test_partial_answer_kept_in_history(loaded, monkeypatch):
    def interrupted(ld, messages, *, on_text, **kw):
        on_text("Rest")
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "generate", interrupted)
    session = ChatSession(loaded, system=SYSTEM, out=lambda t: None)
    assert session.ask("fever?") == "Rest"
    assert session.history[1:] == [{"role": "user", "content": "fever?"}, {"role": "assistant", "content": "Rest"}]


def test_save_writes_the_whole_conversation(loaded, tmp_path):
    session = ChatSession(loaded, system=SYSTEM, out=lambda t: None)
    session.history += [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert run_chat(session, read=Script([f"/save {tmp_path / 'c.json'}", "/exit"])) == 0
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8")) == session.history


# ---- a real `medtune chat` process and SIGINT -------------------------------------------------------------------

@pytest.fixture(scope="module")
def endless_model(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny LLaMA with a long context whose special tokens (stops included) have zero embeddings: greedy decoding
    never picks them, so an answer runs for thousands of tokens (seconds) until Ctrl-C."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[:6] = 0
    out = tmp_path_factory.mktemp("endless-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def signal_masks(pid: int) -> str:
    """A process's blocked/ignored/caught signal masks (why a SIGINT may not reach Python's handler)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "gone"
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def test_sigint_during_an_answer_returns_to_the_prompt(endless_model):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "medtune.cli", "chat", str(endless_model), "--device", "cpu",
                             "--max-new-tokens", "8000", "--repetition-penalty", "1", "--no-repeat-ngram-size", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            # as from a terminal: a suite started in the background (`cmd &` without job control)
                            # ignores SIGINT, and an ignored SIGINT is inherited (Python then never raises Ctrl-C)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = bytearray()
    reader = threading.Thread(target=lambda: [seen.extend(c) for c in iter(lambda: proc.stdout.read(1), b"")],
                              daemon=True)
    reader.start()

    def wait_for(marker: bytes, after: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = seen.find(marker, after)
            if at >= 0:
                return at
            assert proc.poll() is None, (seen.decode(errors="replace"), proc.stderr.read().decode())
            time.sleep(0.05)
        masks = signal_masks(proc.pid)
        proc.kill()
        pytest.fail(f"{marker!r} not printed within {timeout} s: {seen.decode(errors='replace')[-200:]!r}; "
                    f"SIGINT here: {signal.getsignal(signal.SIGINT)}; child: {masks}; child's stderr: "
                    f"{proc.stderr.read().decode(errors='replace')[-3000:]}")

    try:
        wait_for(b"you> ", 0, 120)
        proc.stdin.write(b"What is a fever?\n")
        proc.stdin.flush()
        answer_at = wait_for(b"model> ", 0, 30)
        time.sleep(1.0)  # answering: thousands of tokens take far longer than this
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        stopped_at = wait_for(b"(stopped)", answer_at, 30)
        wait_for(b"you> ", stopped_at, 30)  # back at the prompt, still running
        assert proc.poll() is None
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = seen[answer_at + len(b"model> "):seen.find(b"(stopped)", answer_at)]
    assert len(partial) > 0, "the answer had started streaming before Ctrl-C"  # (newlines, from this model)

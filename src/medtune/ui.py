"""`medtune ui`: a Gradio page that asks the base and the tuned model the same question, side by side.

One prompt box, the sampling knobs, example medical prompts and the not-medical-advice notice. Both answers
stream: the base answer first (adapter switched off), then the tuned one, from the same loaded model — the two
cannot run at once because switching the adapter changes the shared model, so the page also queues requests
one at a time. A plain model (no adapter) gets one column.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

from medtune.errors import MedtuneError
from medtune.generate import Loaded, generate, load_for_inference, user_turn
from medtune.run.card import NOT_FACT_CHECKED, NOT_MEDICAL_ADVICE
from medtune.run.run import Run

EXAMPLES = [
    "What are the early warning signs of a stroke?",
    "How is type 2 diabetes usually managed?",
    "What is the difference between a cold and the flu?",
    "My child has a fever of 38.5 C. When should we see a doctor?",
]
_DONE = object()


def stream_answer(loaded: Loaded, prompt: str, system: str | None, *, use_adapter: bool, max_new_tokens: int,
                  temperature: float, top_p: float) -> Iterator[str]:
    """The answer so far, after each new piece of text (generation runs in a worker thread)."""
    pieces: queue.Queue = queue.Queue()

    def work():
        try:
            generate(loaded, user_turn(prompt, system or None), max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, use_adapter=use_adapter, on_text=pieces.put)
        except Exception as e:  # shown in the page instead of a dead stream
            pieces.put(e)
        finally:
            pieces.put(_DONE)

    threading.Thread(target=work, daemon=True).start()
    text = ""
    while (piece := pieces.get()) is not _DONE:
        if isinstance(piece, MedtuneError):
            yield f"[{piece}]"
            return
        if isinstance(piece, Exception):
            raise piece
        text += piece
        yield text.strip()


def build_ui(loaded: Loaded, system_prompt: str | None = None, references: dict[str, str] | None = None):
    """The Gradio Blocks app for a loaded model or run. `references`: held-out prompts (offered as examples) and
    their reference answers, shown beside the model's answers when that prompt is asked."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    side_by_side = loaded.has_adapter
    references = references or {}
    with gr.Blocks(title=f"medtune · {loaded.name}") as demo:
        gr.Markdown(f"## medtune · `{loaded.name}`")
        gr.Markdown(f"**⚠ Not medical advice.** {NOT_MEDICAL_ADVICE}", elem_id="notice")
        if not side_by_side:
            gr.Markdown("This is a plain model (no adapter), so there is one answer. Open a run directory "
                        "(`medtune ui runs/<name>`) to compare base and tuned answers.")
        prompt = gr.Textbox(label="Your question", lines=3, elem_id="prompt", placeholder="Ask a medical question…")
        with gr.Row():
            submit = gr.Button("Ask", variant="primary", elem_id="submit")
            clear = gr.Button("Clear")
        with gr.Row():
            base = gr.Textbox(label="Base model" if side_by_side else "Model", lines=12, interactive=False,
                              elem_id="base-answer")
            tuned = gr.Textbox(label="Tuned model (base + adapter)", lines=12, interactive=False,
                               elem_id="tuned-answer", visible=side_by_side)
        reference = gr.Textbox(label="Reference answer (from the held-out row this prompt comes from)", lines=4,
                               interactive=False, elem_id="reference", visible=bool(references))
        gr.Markdown(f"**Not fact-checked.** {NOT_FACT_CHECKED}", elem_id="fact-check")
        with gr.Accordion("Sampling", open=False):
            system = gr.Textbox(label="System message", value=system_prompt or "", elem_id="system")
            max_new_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens")
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
        gr.Examples([*references, *EXAMPLES], inputs=prompt)

        def answer(text, system_text, max_tokens, temp, p):
            ref = references.get(text.strip(), "")
            if not text.strip():
                yield "", "", ""
                return
            knobs = dict(max_new_tokens=int(max_tokens), temperature=float(temp), top_p=float(p))
            base_text = ""
            for base_text in stream_answer(loaded, text, system_text, use_adapter=False, **knobs):
                yield base_text, "", ref
            if side_by_side:
                for tuned_text in stream_answer(loaded, text, system_text, use_adapter=True, **knobs):
                    yield base_text, tuned_text, ref

        inputs, outputs = [prompt, system, max_new_tokens, temperature, top_p], [base, tuned, reference]
        submit.click(answer, inputs, outputs, concurrency_limit=1)
        prompt.submit(answer, inputs, outputs, concurrency_limit=1)
        clear.click(lambda: ("", "", "", ""), None, [prompt, *outputs])
    return demo


def launch_options(host: str, port: int, share: bool) -> dict:
    """Blocks.launch arguments: quiet, because `medtune ui` prints its own address line (and Gradio would add a
    "set `share=True`" hint that `medtune ui --share` already covers); a share link is still printed."""
    return dict(server_name=host, server_port=port, share=share, quiet=True)


def launch_ui(model_or_run: str, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
              device: str = "auto", template: str = "auto", system: str | None = None) -> None:
    loaded = load_for_inference(model_or_run, device=device, template=template, for_decoding=True)
    run = Run(model_or_run)
    if system is None and run.is_run:
        system = run.system_prompt
    build_ui(loaded, system, run.references()).queue().launch(**launch_options(host, port, share))

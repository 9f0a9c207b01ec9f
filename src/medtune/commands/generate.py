"""`medtune generate`, `chat` and `compare`: answers from a model or run in the terminal."""

from __future__ import annotations

import argparse
from pathlib import Path

from medtune.commands.common import device_arg, print_side_by_side
from medtune.errors import MedtuneError
from medtune.lazy import lazy
from medtune.run.meta import is_run_dir

chat = lazy("medtune.chat")
gen = lazy("medtune.generate")


def talk_args(p: argparse.ArgumentParser, single_prompt: bool = False) -> None:
    """The model and the sampling flags generate, chat and compare share."""
    p.add_argument("model", help="model name (smollm2-135m-instruct), model folder, hub id, run directory, or a .gguf "
                   "file (run by llama.cpp: pip install 'medtune[gguf]')")
    if single_prompt:
        p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more varied answers")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="penalty on tokens already seen "
                   "(1.0 = off; default: medtune.generate.REPETITION_PENALTY, 1.2); keeps a small model from looping")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N", help="never repeat an N-token "
                   "sequence in one answer (0 = off; default: medtune.generate.NO_REPEAT_NGRAM_SIZE, 4)")
    p.add_argument("--template", default="auto", help="chat template for a plain model: auto, chatml, llama2")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 where the "
                   "device has fast bf16 matmuls; else fp32 with bf16 copies of the weights for one-token steps "
                   "(~1.5x faster answers on an AVX2 CPU; greedy answers then differ from fp32 after a few "
                   "sentences, as bf16 ones do). fp32: exact fp32 throughout")
    device_arg(p)


def register(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt (streams to the terminal)")
    talk_args(p, single_prompt=True)
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal (/reset, /save, /exit; Ctrl-C stops an answer)",
                       description="Multi-turn chat. The model sees as much of the conversation as its context "
                       "(max_position_embeddings) holds less --max-new-tokens; older exchanges are then left out "
                       "with a note (the system prompt stays). Ctrl-C stops an answer; Ctrl-C twice or Ctrl-D exits.")
    talk_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("compare", help="base and tuned answers side by side for a run")
    talk_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.set_defaults(func=cmd_compare)


def load(args) -> gen.Loaded:
    return gen.load_for_inference(args.model, device=args.device, precision=args.precision, template=args.template,
                                  for_decoding=True)


def sampling(args) -> dict:
    """generate()'s sampling keywords: temperature, top_p, and the repetition flags the user set (generate's
    defaults for the others)."""
    knobs = dict(repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)
    return dict(temperature=args.temperature, top_p=args.top_p, **{k: v for k, v in knobs.items() if v is not None})


def cmd_generate(args) -> int:
    loaded = load(args)
    stream = None if args.no_stream else (lambda t: print(t, end="", flush=True))
    text = gen.generate(loaded, gen.user_turn(args.prompt, args.system), max_new_tokens=args.max_new_tokens,
                        on_text=stream, **sampling(args))
    print(text if args.no_stream else "")
    return 0


def cmd_chat(args) -> int:
    session = chat.ChatSession(load(args), system=args.system, max_new_tokens=args.max_new_tokens,
                          generate_kw=sampling(args))
    print(f"medtune chat: not medical advice. {chat.HELP}", flush=True)
    return chat.run_chat(session)


def compare_prompts(args) -> list[str]:
    """--prompt values, then the lines of --prompts-file; at least one."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise MedtuneError("prompts file not found", file=str(path))
        prompts += [p.strip() for p in path.read_text(encoding="utf-8").splitlines() if p.strip()]
    if not prompts:
        raise MedtuneError("give --prompt TEXT (repeatable) or --prompts-file FILE", field="--prompt")
    return prompts


def cmd_compare(args) -> int:
    if not is_run_dir(args.model):
        raise MedtuneError("compare needs a run directory (base + adapter)", file=args.model)
    prompts = compare_prompts(args)
    loaded = load(args)
    kw = dict(max_new_tokens=args.max_new_tokens, **sampling(args))
    samples = []
    for prompt in prompts:
        msgs = gen.user_turn(prompt, args.system)
        samples.append({"prompt": prompt, "base": gen.generate(loaded, msgs, use_adapter=False, **kw),
                        "tuned": gen.generate(loaded, msgs, **kw)})
    print_side_by_side(samples)
    return 0

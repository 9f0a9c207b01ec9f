"""`medtune` command line: parses arguments, calls one function, maps user errors to one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import textwrap
from pathlib import Path

from medtune.errors import MedtuneError

log = logging.getLogger("medtune")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if not verbose else logging.DEBUG, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        for noisy in ("peft", "bitsandbytes", "datasets", "httpx", "accelerate", "lm_eval", "lm-eval"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


# ---- commands ------------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from medtune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # before the slow imports: recipe mistakes report at once
    from medtune.train.loop import run_training

    result = run_training(recipe)
    m = result.metrics
    print(f"\nrun: {result.run_dir}")
    print(f"trained {int(m['steps'])} steps in {m['train_seconds']:.0f} s ({m['tokens_per_s']:.0f} tokens/s), "
          f"final train loss {m['train_loss']:.4f}")
    if "base_eval_ppl" in m and "eval_ppl" in m:
        print(f"held-out perplexity: base {m['base_eval_ppl']:.2f} -> tuned {m['eval_ppl']:.2f}")
    _print_side_by_side(result.samples)
    print(f"\nnext: medtune chat {result.run_dir}    |    model card: {result.run_dir / 'README.md'}")
    return 0


def cmd_data_check(args) -> int:
    from medtune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from medtune.data.prepare import prepare_data
    from medtune.models import load_tokenizer, resolve_model
    from medtune.tokenizer import prepare_tokenizer

    model_dir = resolve_model(recipe.model)
    tok = load_tokenizer(model_dir, recipe.trust_remote_code)
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    data = prepare_data(recipe, tok, chat)
    print(f"model: {recipe.model} (template {chat.template}, stops on {', '.join(chat.stop_tokens)}, "
          f"pad {chat.pad_token})")
    print("\n".join(data.report.lines()))
    return 0


def _load(args):
    from medtune.generate import load_for_inference

    return load_for_inference(args.model, device=args.device, template=args.template)


def cmd_generate(args) -> int:
    from medtune.generate import generate, user_turn

    loaded = _load(args)
    stream = None if args.no_stream else (lambda t: print(t, end="", flush=True))
    text = generate(loaded, user_turn(args.prompt, args.system), max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, on_text=stream)
    print(text if args.no_stream else "")
    return 0


def cmd_chat(args) -> int:
    from medtune.generate import generate

    loaded = _load(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("medtune chat: not medical advice. /reset clears the conversation, /exit quits.", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            print("(conversation cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        answer = generate(loaded, history, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, on_text=lambda t: print(t, end="", flush=True))
        print()
        history.append({"role": "assistant", "content": answer})


def cmd_compare(args) -> int:
    from medtune.generate import generate, is_run_dir, user_turn

    if not is_run_dir(args.model):
        raise MedtuneError("compare needs a run directory (base + adapter)", file=args.model)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise MedtuneError("prompts file not found", file=str(path))
        prompts += [p.strip() for p in path.read_text(encoding="utf-8").splitlines() if p.strip()]
    if not prompts:
        raise MedtuneError("give --prompt TEXT (repeatable) or --prompts-file FILE", field="--prompt")
    loaded = _load(args)
    samples = []
    for prompt in prompts:
        msgs = user_turn(prompt, args.system)
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
        samples.append({"prompt": prompt, "base": generate(loaded, msgs, use_adapter=False, **kw),
                        "tuned": generate(loaded, msgs, **kw)})
    _print_side_by_side(samples)
    return 0


def cmd_eval(args) -> int:
    from medtune.eval.suite import EvalOptions, parse_paths, parse_tasks, run_eval

    tasks = parse_tasks(args.task)
    opts = EvalOptions(model=args.model, tasks=tasks, data=parse_paths(args.data, tasks, "--data"),
                       recipe=args.recipe, overrides=args.set or [], fewshot=args.fewshot,
                       fewshot_data=parse_paths(args.fewshot_data, tasks, "--fewshot-data"), limit=args.limit,
                       batch_size=args.batch_size, compare_base=args.compare_base, all_tokens=args.all_tokens,
                       window=args.window, stride=args.stride, max_new_tokens=args.max_new_tokens,
                       bootstrap=args.bootstrap, precision=args.precision, device=args.device)
    results = run_eval(opts)
    from medtune.eval import report
    from medtune.generate import is_run_dir

    context = {"model": args.model, "command": shlex.join(["medtune", *sys.argv[1:]]), "fewshot": args.fewshot,
               "limit": args.limit}
    print(report.markdown(results))
    if is_run_dir(args.model) and not args.no_save:
        written = report.write_run_results(args.model, results, **context)
        print(f"\nresults: {', '.join(map(str, written))} (and the model card)")
    if args.json:
        print(f"results: {report.write_json(args.json, report.to_json(results, **context))}")
    return 0


def cmd_bench_train(args) -> int:
    from medtune.bench.train import bench_config, format_table, run_bench

    cfg = bench_config(steps=args.steps, model=args.model, data=args.data, quick=args.quick,
                       max_length=args.max_length, batch_size=args.batch_size, systems=args.systems)
    result = run_bench(cfg, json_path=args.json, command=shlex.join(["medtune", *sys.argv[1:]]))
    print(format_table(result))
    if args.json:
        print(f"\nresults: {args.json}")
    return 1 if any(s.get("error") for s in result["systems"].values()) else 0


def cmd_bench_eval(args) -> int:
    from medtune.bench.eval import EvalBenchConfig, format_table, parse_systems, run_bench

    cfg = EvalBenchConfig(model=args.model or EvalBenchConfig.model, task=args.task, data=args.data,
                          limit=args.limit or None, systems=parse_systems(args.systems), batch_size=args.batch_size,
                          precision=args.precision)
    result = run_bench(cfg, json_path=args.json, command=shlex.join(["medtune", *sys.argv[1:]]))
    print(format_table(result))
    if args.json:
        print(f"\nresults: {args.json}")
    return 1 if any(s.get("error") for s in result["systems"].values()) else 0


def _print_side_by_side(samples: list[dict], width: int = 60) -> None:
    for s in samples:
        print(f"\n### {s['prompt']}")
        left = textwrap.wrap(s["base"], width) or [""]
        right = textwrap.wrap(s["tuned"], width) or [""]
        print(f"{'BASE':<{width}} | TUNED")
        print(f"{'-' * width}-+-{'-' * width}")
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            print(f"{a:<{width}} | {b}")


# ---- parser --------------------------------------------------------------------------------------------------

def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. lora.r=16 train.max_steps=50")


def _talk_args(p: argparse.ArgumentParser, single_prompt: bool = False) -> None:
    p.add_argument("model", help="model name (smollm2-135m-instruct), model folder, hub id, or run directory")
    if single_prompt:
        p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more varied answers")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--template", default="auto", help="chat template for a plain model: auto, chatml, llama2")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def build_parser() -> argparse.ArgumentParser:
    from medtune.recipe import recipe_help

    parser = argparse.ArgumentParser(prog="medtune", description="Fine-tune LLaMA-family models on medical data "
                                     "with LoRA/QLoRA, then evaluate, chat with and ship them. Not medical advice.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model from a recipe", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune from a recipe. Recipe keys (override any with key=value):\n\n" + recipe_help())
    _recipe_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="inspect training data without training")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("check", help="rows read/kept/dropped by reason, token lengths, the first rendered example")
    _recipe_args(q)
    q.set_defaults(func=cmd_data_check)

    p = sub.add_parser("generate", help="answer one prompt (streams to the terminal)")
    _talk_args(p, single_prompt=True)
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal (/reset, /exit)")
    _talk_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("compare", help="base and tuned answers side by side for a run")
    _talk_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="perplexity, medical benchmarks (lm-eval), ROUGE; base vs tuned with CIs",
                       description="Evaluate a model or a run. Benchmarks (medqa, pubmedqa, mmlu_medical, medmcqa) are "
                       "read from local files in their public layouts and scored by log-likelihood with "
                       "lm-evaluation-harness. Results of a run go to RUN/eval/<task>.json/.md and its model card.")
    p.add_argument("model", help="model name (smollm2-135m-instruct), model folder, or run directory")
    p.add_argument("--task", action="append", required=True, help="perplexity, medqa, pubmedqa, mmlu_medical, medmcqa, "
                   "rouge; repeatable or comma-separated")
    p.add_argument("--data", action="append", metavar="[TASK=]PATH", help="the task's file (mmlu_medical: a folder of "
                   "<subject>_<split>.csv); perplexity of a run defaults to its held-out split")
    p.add_argument("--fewshot", type=int, default=0, help="k-shot benchmark prompts (shots from --fewshot-data)")
    p.add_argument("--fewshot-data", action="append", metavar="[TASK=]PATH", help="file the shots come from (first k)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items (per MMLU subject)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--compare-base", action="store_true", help="also evaluate the base (adapter off) on the same "
                   "items: delta and 95%% paired-bootstrap interval per metric")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for --compare-base")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results to FILE")
    p.add_argument("--no-save", action="store_true", help="do not write RUN/eval/ or touch the model card")
    p.add_argument("--all-tokens", action="store_true", help="perplexity over every token, not only the answers")
    p.add_argument("--window", type=int, default=None, help="perplexity context window (default: the run's max_length)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window step for long texts (default window/2)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="rouge: longest generated answer")
    p.add_argument("--recipe", default=None, help="recipe whose data section reads --data for perplexity/rouge "
                   "(default: the run's own)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override for reading --data, e.g. "
                   "data.format=qa (repeatable)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto = bf16 where fast")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="benchmarks on this machine: medtune against the seed recipe and TRL")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    q = bench_sub.add_parser("train", help="tokens/s, peak memory, loss and MFU of seed, TRL and medtune training",
                             description="Train the same model on the same texts for the same number of steps with "
                             "the seed notebooks' TRL recipe (seed), TRL's fastest CPU setup (trl) and medtune's own "
                             "loop (medtune), each in its own process, and print them side by side. See bench/README.md.")
    q.add_argument("--steps", type=int, default=None, help="optimizer steps per system (default 30, --quick 8); "
                   "the first 2 are warm-up and left out of tokens/s")
    q.add_argument("--model", default=None, help="model name or folder (default smollm2-135m-instruct)")
    q.add_argument("--data", default=None, help="rows with page_title/page_text (or text); default "
                   "../shared/data/train/medical_terms.jsonl, else demo:terms")
    q.add_argument("--quick", action="store_true", help="smoke run: 8 steps at max length 256")
    q.add_argument("--json", metavar="FILE", default=None, help="also write every number to FILE as JSON")
    q.add_argument("--max-length", type=int, default=None, help="longest example in tokens (default 512, --quick 256)")
    q.add_argument("--batch-size", type=int, default=4, help="examples (TRL packing: packed rows) per step")
    q.add_argument("--systems", default="seed,trl,medtune", help="comma-separated subset of seed,trl,medtune, "
                   "run in this order")
    q.set_defaults(func=cmd_bench_train)
    q = bench_sub.add_parser("eval", help="benchmark scoring speed and accuracy: medtune eval vs lm-eval's HF backend",
                             description="Score the same benchmark items with the lm_eval command line (accuracy "
                             "check), lm-eval's HF backend with its defaults, and medtune's eval path, each in its own "
                             "process; print items/s, seconds and accuracy side by side.")
    q.add_argument("--model", default=None, help="model name or folder (default smollm2-135m-instruct)")
    q.add_argument("--task", default="pubmedqa", choices=["pubmedqa", "mmlu_medical", "medqa", "medmcqa"])
    q.add_argument("--data", default=None, help="benchmark file (default ../shared/data/eval/<task's file>)")
    q.add_argument("--limit", type=int, default=100, help="first N items (per MMLU subject); 0 = all")
    q.add_argument("--systems", default="lm-eval-cli,lm-eval,medtune", help="comma-separated subset, run in order")
    q.add_argument("--batch-size", type=int, default=16, help="medtune's batch size")
    q.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="medtune's precision")
    q.add_argument("--json", metavar="FILE", default=None, help="also write every number to FILE as JSON")
    q.set_defaults(func=cmd_bench_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args) or 0
    except MedtuneError as e:
        print(f"medtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmedtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

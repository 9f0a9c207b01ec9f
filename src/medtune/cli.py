"""`medtune` command line: parses arguments, calls one function, maps user errors to one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
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
    if args.nproc:
        from medtune.train.distributed import launch

        launch(args.nproc, ["train", args.recipe, *args.overrides, *(["--force"] if args.force else [])])
    from medtune.train.job import run_training

    result = run_training(recipe, force=args.force)
    if not result.main:
        return 0
    m = result.metrics
    print(f"\nrun: {result.run_dir}")
    print(f"trained {int(m['steps'])} steps in {m['train_seconds']:.0f} s ({m['tokens_per_s']:.0f} tokens/s), "
          f"final train loss {m['train_loss']:.4f}")
    if "base_eval_ppl" in m and "eval_ppl" in m:
        from medtune.run.card import number  # the card's rounding: one figure everywhere

        print(f"held-out perplexity: base {number(m['base_eval_ppl'])} -> tuned {number(m['eval_ppl'])}")
    _print_side_by_side(result.samples)
    print(f"\nnext: medtune chat {result.run_dir}    |    model card: {result.run_dir / 'README.md'}")
    if result.gate is not None:
        from medtune.eval.gate import format_gate

        print("\n" + format_gate(result.gate))
        return 0 if result.gate["passed"] else 1
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
    from medtune.train.memory import memory_report

    print(memory_report(recipe, model_dir))
    return 0


def _load(args):
    from medtune.generate import load_for_inference

    return load_for_inference(args.model, device=args.device, template=args.template)


def _repetition(args) -> dict:
    """The repetition flags the user set; generate's defaults for the others."""
    knobs = dict(repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)
    return {k: v for k, v in knobs.items() if v is not None}


def cmd_generate(args) -> int:
    from medtune.generate import generate, user_turn

    loaded = _load(args)
    stream = None if args.no_stream else (lambda t: print(t, end="", flush=True))
    text = generate(loaded, user_turn(args.prompt, args.system), max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, on_text=stream, **_repetition(args))
    print(text if args.no_stream else "")
    return 0


def cmd_chat(args) -> int:
    from medtune.chat import HELP, ChatSession, run_chat

    loaded = _load(args)
    session = ChatSession(loaded, system=args.system, max_new_tokens=args.max_new_tokens,
                          generate_kw=dict(temperature=args.temperature, top_p=args.top_p, **_repetition(args)))
    print(f"medtune chat: not medical advice. {HELP}", flush=True)
    return run_chat(session)


def cmd_compare(args) -> int:
    from medtune.generate import generate, user_turn
    from medtune.run.meta import is_run_dir

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
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  **_repetition(args))
        samples.append({"prompt": prompt, "base": generate(loaded, msgs, use_adapter=False, **kw),
                        "tuned": generate(loaded, msgs, **kw)})
    _print_side_by_side(samples)
    return 0


def cmd_serve(args) -> int:
    from medtune.serve.app import API_KEY_ENV, run_server

    run_server(args.model, args.adapter or [], host=args.host, port=args.port,
               api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, max_queue=args.max_queue,
               max_tokens=args.max_tokens, max_batch=args.max_batch, device=args.device,
               allow_no_key=args.allow_no_key, max_body_bytes=args.max_body_bytes)
    return 0


def cmd_bench_serve(args) -> int:
    from medtune.bench.serve_load import format_table, run_serve_bench

    result = run_serve_bench(args.model, adapters=args.adapter or [], clients=args.clients, seconds=args.seconds,
                             max_tokens=args.max_tokens, max_batch=args.max_batch,
                             schemathesis_examples=args.schemathesis_examples,
                             json_path=args.json, command=shlex.join(["medtune", *sys.argv[1:]]))
    print(format_table(result))
    if args.json:
        print(f"\nresults: {args.json}")
    return 0


def cmd_eval(args) -> int:
    from medtune.eval.suite import EvalOptions, parse_paths, parse_tasks, run_eval

    tasks = parse_tasks(args.task)
    opts = EvalOptions(model=args.model, tasks=tasks, data=parse_paths(args.data, tasks, "--data"),
                       recipe=args.recipe, overrides=args.set or [], fewshot=args.fewshot,
                       fewshot_data=parse_paths(args.fewshot_data, tasks, "--fewshot-data"), limit=args.limit,
                       batch_size=args.batch_size, compare_base=args.compare_base, all_tokens=args.all_tokens,
                       window=args.window, stride=args.stride, max_new_tokens=args.max_new_tokens,
                       bootstrap=args.bootstrap, precision=args.precision, device=args.device,
                       judge_url=args.judge, judge_model=args.judge_model, judge_key=args.judge_key,
                       judge_timeout=args.judge_timeout)
    results = run_eval(opts)
    from medtune.eval import report
    from medtune.run.meta import is_run_dir

    context = {"model": args.model, "command": shlex.join(["medtune", *sys.argv[1:]]), "fewshot": args.fewshot,
               "limit": args.limit, "data": opts.data}
    print(report.markdown(results))
    if is_run_dir(args.model) and not args.no_save:
        written = report.write_run_results(args.model, results, **context)
        print(f"\nresults: {', '.join(map(str, written))} (and the model card)")
    if args.json:
        print(f"results: {report.write_json(args.json, report.to_json(results, **context))}")
    return 0


def cmd_gate(args) -> int:
    from medtune.eval.gate import format_gate, gate_config, run_gate

    cfg = gate_config(args.run, args.config, data=args.data, limit=args.limit, bootstrap=args.bootstrap)
    report = run_gate(args.run, cfg, command=shlex.join(["medtune", *sys.argv[1:]]), batch_size=args.batch_size,
                      precision=args.precision, device=args.device)
    print(format_gate(report))
    print(f"\nresults: {Path(args.run) / 'gate.json'}, {Path(args.run) / 'plots' / 'gate.png'} (and the model card)")
    return 0 if report["passed"] else 1


def cmd_bench_train(args) -> int:
    from medtune.bench.train_speed import bench_config, format_table, run_bench

    cfg = bench_config(steps=args.steps, model=args.model, data=args.data, quick=args.quick,
                       max_length=args.max_length, batch_size=args.batch_size, systems=args.systems)
    result = run_bench(cfg, json_path=args.json, command=shlex.join(["medtune", *sys.argv[1:]]))
    print(format_table(result))
    if args.json:
        print(f"\nresults: {args.json}")
    return 1 if any(s.get("error") for s in result["systems"].values()) else 0


def cmd_bench_scale(args) -> int:
    from medtune.bench.scale import format_table, run_scale, scale_config

    cfg = scale_config(widths=args.widths, methods=args.methods, lengths=args.lengths, steps=args.steps,
                       quick=args.quick)
    result = run_scale(cfg, json_path=args.json, plot_path=args.plot, command=shlex.join(["medtune", *sys.argv[1:]]))
    print(format_table(result))
    return 1 if any(r.get("error") for r in result["rows"]) else 0


def cmd_bench_generate(args) -> int:
    from medtune.bench.generate_speed import SYSTEMS, format_table, run_bench
    from medtune.bench.harness import parse_systems

    systems = parse_systems(args.systems, SYSTEMS)
    result = run_bench(model=args.model, max_new_tokens=args.max_new_tokens, systems=systems, json_path=args.json,
                       command=shlex.join(["medtune", *sys.argv[1:]]))
    print(format_table(result))
    return 1 if any(s.get("error") for s in result["systems"].values()) else 0


def cmd_merge(args) -> int:
    from medtune.export.merge import merge_run

    out = merge_run(args.run, args.out, dtype=args.dtype)
    print(f"merged model: {out}  (loads with AutoModelForCausalLM.from_pretrained)")
    print(f"next: medtune chat {shlex.quote(str(out))}    |    medtune export {shlex.quote(str(out))} --format gguf "
          "--quant q8_0 --out model.gguf")
    return 0


def cmd_export(args) -> int:
    from medtune.export.gguf import export_gguf

    result = export_gguf(args.model, args.out, quant=args.quant)
    print(f"GGUF: {result.gguf}\nOllama Modelfile: {result.modelfile}")
    print(f"next: ollama create my-model -f {shlex.quote(str(result.modelfile))} && ollama run my-model")
    return 0


def cmd_ui(args) -> int:
    from medtune.ui import launch_ui

    print(f"medtune ui: open http://{args.host}:{args.port} (Ctrl-C stops). Not medical advice.", flush=True)
    launch_ui(args.model, host=args.host, port=args.port, share=args.share, device=args.device,
              template=args.template, system=args.system)
    return 0


def cmd_push(args) -> int:
    from medtune.push import push_run

    url = push_run(args.run, args.repo_id, merged=args.merged, private=args.private, dtype=args.dtype,
                   base_model=args.base_model)
    print(f"pushed {'merged model' if args.merged else 'adapter'} to {args.repo_id}: {url}")
    return 0


def cmd_bench_eval(args) -> int:
    from medtune.bench.eval_speed import EvalBenchConfig, format_table, parse_systems, run_bench

    cfg = EvalBenchConfig(model=args.model or EvalBenchConfig.model, task=args.task, data=args.data,
                          limit=args.limit or None, systems=parse_systems(args.systems), batch_size=args.batch_size,
                          precision=args.precision, medsafety_data=args.medsafety_data,
                          medsafety_limit=args.medsafety_limit or None)
    result = run_bench(cfg, json_path=args.json, command=shlex.join(["medtune", *sys.argv[1:]]))
    print(format_table(result))
    if args.json:
        print(f"\nresults: {args.json}")
    return 1 if any(s.get("error") for s in result["systems"].values()) else 0


def _print_side_by_side(samples: list[dict]) -> None:
    from medtune.sidebyside import side_by_side

    if samples:
        print("\n" + side_by_side(samples))


# ---- parser --------------------------------------------------------------------------------------------------

def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. lora.r=16 train.max_steps=50")


def _talk_args(p: argparse.ArgumentParser, single_prompt: bool = False) -> None:
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
    p.add_argument("--nproc", type=int, default=0, metavar="N", help="train with N processes on this machine through "
                   "torchrun (gloo on CPU, NCCL on GPU); for several machines or FSDP/DeepSpeed see recipes/launch/")
    p.add_argument("--force", action="store_true", help="start even when the memory estimate says it will not fit")
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

    p = sub.add_parser("chat", help="multi-turn chat in the terminal (/reset, /save, /exit; Ctrl-C stops an answer)",
                       description="Multi-turn chat. The model sees as much of the conversation as its context "
                       "(max_position_embeddings) holds less --max-new-tokens; older exchanges are then left out "
                       "with a note (the system prompt stays). Ctrl-C stops an answer; Ctrl-C twice or Ctrl-D exits.")
    _talk_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("compare", help="base and tuned answers side by side for a run")
    _talk_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("merge", help="fold a run's adapter into its base model and save a plain model folder",
                       description="Load the run's base model in full precision (also for QLoRA runs), merge the "
                       "adapter, save safetensors + tokenizer + generation config + model card.")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--out", required=True, help="new folder for the merged model")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weight type of the saved model")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="a GGUF file for llama.cpp / Ollama, with an Ollama Modelfile",
                       description="Convert a run (merged first) or a model folder to GGUF with llama.cpp's own "
                       "converter (installed once into $MEDTUNE_HOME/tools), and write <out>.Modelfile for Ollama.")
    p.add_argument("model", help="run directory, merged model folder, or model name")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="export format")
    p.add_argument("--quant", default="f16", choices=["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"],
                   help="GGUF weight type; q4_k_m/q5_k_m/q6_k (what Ollama and llama.cpp users usually run) need "
                   "llama.cpp's quantizer: pip install 'medtune[gguf]'")
    p.add_argument("--out", required=True, help="output .gguf file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ui", help="a web page with base and tuned answers side by side (Gradio)")
    p.add_argument("model", help="run directory (base vs tuned), or a model name/folder or .gguf file (one answer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to share on your network)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    p.add_argument("--system", default=None, help="system message (default: the run's)")
    p.add_argument("--template", default="auto", help="chat template for a plain model: auto, chatml, llama2")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("push", help="upload a run's adapter (or merged weights), tokenizer and card to the Hub",
                       description="Upload with huggingface_hub (HF_TOKEN or `hf auth login`; HF_ENDPOINT for a "
                       "mirror). The model card carries the not-medical-advice notice.")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub (created if missing)")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the base and upload full weights")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weight type with --merged")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--base-model", default=None, metavar="ORG/NAME", help="hub id of the base model, written to "
                   "adapter_config.json; needed when the run trained on a local folder")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API for a base model and its adapters",
                       description="Serve a model or run over an OpenAI-compatible API (/v1/chat/completions, "
                       "/v1/completions, /v1/models, /health, /openapi.json). The request's `model` field picks the "
                       "base or an adapter. Requests wait in a bounded queue (429 when full) and are answered "
                       "in batches of up to --max-batch. Not medical advice.")
    p.add_argument("model", help="model name, model folder or run directory (a run's adapter is served under the "
                   "run folder's name, its base under the base's name), or a .gguf file (run by llama.cpp, one "
                   "request at a time, no --adapter: pip install 'medtune[gguf]')")
    p.add_argument("--adapter", action="append", metavar="NAME=RUN", help="also serve the adapter of run directory "
                   "RUN as model NAME (repeatable; every run must be trained on the same base)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes "
                   "(default: $MEDTUNE_API_KEY, else no key). Without a key only requests whose Host header is "
                   "localhost, 127.0.0.1, [::1] or --host are served (421 otherwise: DNS rebinding)")
    p.add_argument("--allow-no-key", action="store_true", help="serve a non-loopback --host (e.g. 0.0.0.0) "
                   "without an API key (refused otherwise)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; bigger ones are "
                   "413 before they are read (default 1 MiB)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get HTTP 429")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on a request's max_tokens (and the default)")
    p.add_argument("--max-batch", type=int, default=4, help="waiting requests answered together in one batch "
                   "(1 = one at a time)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="perplexity, medical benchmarks (lm-eval), ROUGE; base vs tuned with CIs",
                       description="Evaluate a model or a run. Benchmarks (medqa, pubmedqa, mmlu_medical, medmcqa) are "
                       "read from local files in their public layouts and scored by log-likelihood with "
                       "lm-evaluation-harness. Results of a run go to RUN/eval/<task>.json/.md and its model card.")
    p.add_argument("model", help="model name (smollm2-135m-instruct), model folder, or run directory")
    p.add_argument("--task", action="append", required=True, help="perplexity, medqa, pubmedqa, mmlu_medical, medmcqa, "
                   "rouge, rubrics (long answers graded by --judge; default data demo:rubrics), medsafety (refusal "
                   "rate on harmful requests), overrefusal (refusal rate on benign questions); honesty probes "
                   "<benchmark>_nota (correct option's text replaced by 'None of the above'; not for pubmedqa, which "
                   "has no option texts), <benchmark>_falseconf (a wrong answer suggested: acc, agree_rate), "
                   "<benchmark>_abstain (an 'I do not know' option: abstain_rate, answered_acc; aurc, acc_at_50/80 "
                   "from the original items' confidence), zero-shot; repeatable or comma-separated")
    p.add_argument("--data", action="append", metavar="[TASK=]PATH", help="the task's file (mmlu_medical: a folder of "
                   "<subject>_<split>.csv; medsafety: a MedSafetyBench folder of category_N.csv or a .txt/.jsonl/.csv "
                   "of prompts; overrefusal: the same plain layouts, default demo:benign); a probe reads its "
                   "benchmark's (--data medqa=PATH serves medqa_nota too); perplexity of a run defaults to its "
                   "held-out split")
    p.add_argument("--fewshot", type=int, default=0, help="k-shot benchmark prompts (shots from --fewshot-data)")
    p.add_argument("--fewshot-data", action="append", metavar="[TASK=]PATH", help="file the shots come from (first k)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items (per MMLU subject, per safety "
                   "category)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--compare-base", action="store_true", help="also evaluate the base (adapter off) on the same "
                   "items: delta and 95%% paired-bootstrap interval per metric")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for --compare-base")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results to FILE")
    p.add_argument("--no-save", action="store_true", help="do not write RUN/eval/ or touch the model card")
    p.add_argument("--all-tokens", action="store_true", help="perplexity over every token, not only the answers")
    p.add_argument("--window", type=int, default=None, help="perplexity context window (default: the run's max_length)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window step for long texts (default window/2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest generated answer (default: rouge and "
                   "rubrics 128, medsafety/overrefusal 96)")
    p.add_argument("--recipe", default=None, help="recipe whose data section reads --data for perplexity/rouge "
                   "(default: the run's own)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override for reading --data, e.g. "
                   "data.format=qa (repeatable)")
    p.add_argument("--judge", metavar="URL", default=None, help="OpenAI-compatible endpoint that grades answers "
                   "(rubrics), e.g. http://127.0.0.1:8000/v1 of `medtune serve`, or a hosted API")
    p.add_argument("--judge-model", metavar="NAME", default=None, help="the judge's model name (its `model` field)")
    p.add_argument("--judge-key", metavar="KEY", default=None, help="the judge's API key (default: "
                   "$MEDTUNE_JUDGE_KEY, else $OPENAI_API_KEY, else none)")
    p.add_argument("--judge-timeout", type=float, default=60.0, metavar="SECONDS", help="longest wait for one "
                   "judge answer (429/5xx are retried 3 times with backoff; any other failure stops the eval)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto = bf16 where fast")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("gate", help="release gate: base vs tuned on a suite, a verdict per axis, exit 1 on a regression",
                       description="Run a suite of `medtune eval` tasks on the run with the adapter on and off (same "
                       "items, one model load) and judge every axis (task.metric) with its 95%% paired-bootstrap "
                       "interval: improved (interval entirely on the better side of 0), regressed (entirely on the "
                       "worse side and the delta worse than the axis's tolerance; require: non_inferior: the "
                       "interval's worse end past the tolerance), else no significant change. The suite comes from "
                       "--config (a gate.yaml with the recipe's gate: keys) or the run's recipe `gate:` section; "
                       "default: held-out perplexity plus every task given a file. Writes RUN/gate.json, "
                       "RUN/plots/gate.png and the card's Release gate section. Exit 0: no gating axis regressed; "
                       "1: one did (named, one line each); 2: a mistake in the input.")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--config", metavar="GATE.YAML", default=None, help="the gate's config: tasks, data, axes "
                   "(tolerance, gating, require), limit, bootstrap, options (default: the run's recipe gate: section)")
    p.add_argument("--data", action="append", metavar="TASK=PATH", help="a task's file, added to the suite (medqa, "
                   "pubmedqa, mmlu_medical (a folder), medmcqa, rouge; perplexity=FILE instead of the held-out split)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each task")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples per axis (default 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto = bf16 where fast")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_gate)

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
    q.add_argument("--systems", default="seed,trl,medtune,qlora", help="comma-separated subset of seed,trl,medtune,qlora, "
                   "run in this order")
    q.set_defaults(func=cmd_bench_train)
    q = bench_sub.add_parser("scale", help="tokens/s and where memory goes, by sequence length and model width",
                             description="Train random-init LLaMA models shaped like SmolLM2-135M, -360M and a ~1B "
                             "model with medtune's step (LoRA and QLoRA) at several sequence lengths, each in its own "
                             "process; print tokens/s and peak memory split into runtime, weights, LoRA+optimizer, "
                             "activations and logits. See bench/README.md.")
    q.add_argument("--widths", default=None, help="comma-separated subset of 135m,360m,1b (default all)")
    q.add_argument("--methods", default=None, help="comma-separated subset of lora,qlora (default both)")
    q.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default 256,512,1024,2048)")
    q.add_argument("--steps", type=int, default=3, help="steps per configuration; the first is warm-up")
    q.add_argument("--quick", action="store_true", help="smoke run: 135m, lengths 256,512, 2 steps")
    q.add_argument("--json", metavar="FILE", default=None, help="also write every number to FILE as JSON")
    q.add_argument("--plot", metavar="FILE.png", default=None, help="also draw tokens/s and peak memory to FILE.png")
    q.set_defaults(func=cmd_bench_scale)
    q = bench_sub.add_parser("generate", help="answer tokens/s and time to first token: transformers pipeline vs medtune",
                             description="Answer the same medical prompts greedily with the seed notebooks' "
                             "transformers pipeline and with medtune's generate, each in its own process, and print "
                             "tokens/s, decode tokens/s and time to first token side by side. See bench/README.md.")
    q.add_argument("--model", default="smollm2-135m-instruct", help="model name or folder (a run directory with "
                   "--systems medtune)")
    q.add_argument("--max-new-tokens", type=int, default=128, help="longest answer per prompt")
    q.add_argument("--systems", default="pipeline,medtune", help="comma-separated subset of pipeline,medtune")
    q.add_argument("--json", metavar="FILE", default=None, help="also write every number to FILE as JSON")
    q.set_defaults(func=cmd_bench_generate)
    q = bench_sub.add_parser("serve", help="load test `medtune serve` on loopback, then fuzz its API with schemathesis",
                             description="Start `medtune serve` in a subprocess on a free loopback port, run N "
                             "concurrent streaming chat clients for a bounded time (requests/s, tokens/s, p50/p95 "
                             "latency and time to first token, errors), then run schemathesis against /openapi.json "
                             "and count server errors (5xx).")
    q.add_argument("model", nargs="?", default=None, help="model name, folder or run (default smollm2-135m-instruct)")
    q.add_argument("--adapter", action="append", metavar="NAME=RUN", help="adapters to serve too; clients spread "
                   "their requests over the base and every adapter")
    q.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    q.add_argument("--seconds", type=float, default=30.0, help="how long clients send requests")
    q.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    q.add_argument("--max-batch", type=int, default=4, help="the server's --max-batch (1 = one request at a time)")
    q.add_argument("--schemathesis-examples", type=int, default=20, help="schemathesis examples per operation; "
                   "0 skips schemathesis")
    q.add_argument("--json", metavar="FILE", default=None, help="also write every number to FILE as JSON")
    q.set_defaults(func=cmd_bench_serve)
    q = bench_sub.add_parser("eval", help="benchmark scoring speed and accuracy: medtune eval vs lm-eval's HF backend",
                             description="Score the same benchmark items with the lm_eval command line (accuracy "
                             "check), lm-eval's HF backend with its defaults, and medtune's eval path, each in its own "
                             "process; print items/s, seconds and accuracy side by side. The medsafety row times "
                             "answering MedSafetyBench requests (generation + refusal classifier).")
    q.add_argument("--model", default=None, help="model name or folder (default smollm2-135m-instruct)")
    q.add_argument("--task", default="pubmedqa", choices=["pubmedqa", "mmlu_medical", "medqa", "medmcqa"])
    q.add_argument("--data", default=None, help="benchmark file (default ../shared/data/eval/<task's file>)")
    q.add_argument("--limit", type=int, default=100, help="first N items (per MMLU subject); 0 = all")
    q.add_argument("--systems", default="lm-eval-cli,lm-eval,medtune,medsafety", help="comma-separated subset, run in "
                   "order; medsafety = generation speed of `medtune eval --task medsafety` (items/s, refusal rate)")
    q.add_argument("--medsafety-data", default=None, help="MedSafetyBench folder for the medsafety row (default "
                   "../shared/data/safety/medsafetybench/train)")
    q.add_argument("--medsafety-limit", type=int, default=10, help="medsafety items per category (9 categories)")
    q.add_argument("--batch-size", type=int, default=16, help="medtune's batch size (generation: half of it)")
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

"""`medtune bench ...`: measurements on this machine, medtune against the seed recipe, TRL, lm-eval and pipelines."""

from __future__ import annotations

from collections.abc import Iterable

from medtune.commands.common import PRECISIONS, args_for, command_line, options_from_args
from medtune.lazy import lazy

eval_speed = lazy("medtune.bench.eval_speed")
generate_speed = lazy("medtune.bench.generate_speed")
harness = lazy("medtune.bench.harness")
scale = lazy("medtune.bench.scale")
serve_load = lazy("medtune.bench.serve_load")
train_speed = lazy("medtune.bench.train_speed")


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks on this machine: medtune against the seed recipe and TRL")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    register_train(bench_sub)
    register_scale(bench_sub)
    register_generate(bench_sub)
    register_serve(bench_sub)
    register_eval(bench_sub)


def register_train(sub) -> None:
    q = sub.add_parser("train", help="tokens/s, peak memory, loss and MFU of seed, TRL and medtune training",
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


def register_scale(sub) -> None:
    q = sub.add_parser("scale", help="tokens/s and where memory goes, by sequence length and model width",
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


def register_generate(sub) -> None:
    q = sub.add_parser("generate", help="answer tokens/s and time to first token: transformers pipeline vs medtune (and its GGUF export)",
                       description="Answer the same medical prompts greedily with the seed notebooks' "
                       "transformers pipeline and with medtune's generate, each in its own process, and print "
                       "tokens/s, decode tokens/s and time to first token side by side. See bench/README.md.")
    q.add_argument("--model", default="smollm2-135m-instruct", help="model name or folder (a run directory with "
                   "--systems medtune)")
    q.add_argument("--max-new-tokens", type=int, default=128, help="longest answer per prompt")
    q.add_argument("--systems", default="pipeline,medtune", help="comma-separated subset of pipeline,medtune,gguf "
                   "(gguf: llama.cpp on the model's GGUF export; needs medtune[gguf])")
    q.add_argument("--gguf", metavar="FILE", default=None, help="the .gguf the gguf system runs (default: the model "
                   "exported by `medtune export`, see --gguf-quant)")
    q.add_argument("--gguf-quant", default="f16", help="quantisation of that export (as `medtune export --quant`)")
    q.add_argument("--json", metavar="FILE", default=None, help="also write every number to FILE as JSON")
    q.set_defaults(func=cmd_bench_generate)


def register_serve(sub) -> None:
    q = sub.add_parser("serve", help="load test `medtune serve` on loopback, then fuzz its API with schemathesis",
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


def register_eval(sub) -> None:
    q = sub.add_parser("eval", help="benchmark scoring speed and accuracy: medtune eval vs lm-eval's HF backend",
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
    q.add_argument("--precision", default="auto", choices=PRECISIONS, help="medtune's precision")
    q.add_argument("--json", metavar="FILE", default=None, help="also write every number to FILE as JSON")
    q.set_defaults(func=cmd_bench_eval)


def failed(rows: Iterable[dict]) -> int:
    """Exit 1 when any system (or configuration) of the bench failed; its error is in the table."""
    return 1 if any(r.get("error") for r in rows) else 0


def cmd_bench_train(args) -> int:
    cfg = train_speed.bench_config(**args_for(train_speed.bench_config, args))
    result = train_speed.run_bench(cfg, json_path=args.json, command=command_line())
    print(train_speed.format_table(result))
    if args.json:
        print(f"\nresults: {args.json}")
    return failed(result["systems"].values())


def cmd_bench_scale(args) -> int:
    cfg = scale.scale_config(**args_for(scale.scale_config, args))
    result = scale.run_scale(cfg, json_path=args.json, plot_path=args.plot, command=command_line())
    print(scale.format_table(result))
    return failed(result["rows"])


def cmd_bench_generate(args) -> int:
    result = generate_speed.run_bench(**args_for(generate_speed.run_bench, args, json_path=args.json,
                                                 systems=harness.parse_systems(args.systems, generate_speed.SYSTEMS),
                                                 command=command_line()))
    print(generate_speed.format_table(result))
    return failed(result["systems"].values())


def cmd_bench_serve(args) -> int:
    result = serve_load.run_serve_bench(**args_for(serve_load.run_serve_bench, args, adapters=args.adapter or [],
                                                   json_path=args.json, command=command_line()))
    print(serve_load.format_table(result))
    if args.json:
        print(f"\nresults: {args.json}")
    return 0


def cmd_bench_eval(args) -> int:
    cfg = options_from_args(eval_speed.EvalBenchConfig, args, model=args.model or eval_speed.EvalBenchConfig.model,
                            limit=args.limit or None, systems=eval_speed.parse_systems(args.systems),
                            medsafety_limit=args.medsafety_limit or None)
    result = eval_speed.run_bench(cfg, json_path=args.json, command=command_line())
    print(eval_speed.format_table(result))
    if args.json:
        print(f"\nresults: {args.json}")
    return failed(result["systems"].values())

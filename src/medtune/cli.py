"""`medtune` command line: builds the parser from the command modules (medtune.commands), parses, calls one
handler, maps user errors to one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from medtune.commands import bench, data, export, generate, serve, train, ui
from medtune.commands import eval as evaluate
from medtune.errors import MedtuneError

log = logging.getLogger("medtune")
# Each adds its subcommands' parsers, in the order `medtune --help` lists them.
REGISTRARS = (train.register, data.register, generate.register, export.register, ui.register, export.register_push,
              serve.register, evaluate.register, bench.register)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if not verbose else logging.DEBUG, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        import transformers  # heavy (~1.5 s): only once a command runs, never for --help

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        for noisy in ("peft", "bitsandbytes", "datasets", "httpx", "accelerate", "lm_eval", "lm-eval"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtune", description="Fine-tune LLaMA-family models on medical data "
                                     "with LoRA/QLoRA, then evaluate, chat with and ship them. Not medical advice.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.process_entry = argv is None  # the console script / python -m: a handler may re-execute the process
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

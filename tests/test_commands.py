"""medtune.commands: each module registers the parsers it handles, and every flag reaches the function or options
dataclass it names (the flags are no longer copied by hand, so a renamed field or dest must fail here)."""

from __future__ import annotations

import argparse
import functools

import pytest

from medtune.bench import eval_speed, generate_speed, scale, serve_load, train_speed
from medtune.bench.eval_speed import EvalBenchConfig
from medtune.cli import REGISTRARS, main
from medtune.commands import bench, data, export, generate, serve, train, ui
from medtune.commands import eval as evaluate
from medtune.commands.common import args_for, command_line, names_of, options_from_args
from medtune.eval.suite import EvalOptions
from medtune.serve.app import API_KEY_ENV

# every command path → the module whose handler answers it
OWNERS = {("train",): train, ("data", "check"): data, ("generate",): generate, ("chat",): generate,
          ("compare",): generate, ("merge",): export, ("export",): export, ("push",): export, ("ui",): ui,
          ("serve",): serve, ("eval",): evaluate, ("gate",): evaluate, ("bench", "train"): bench,
          ("bench", "scale"): bench, ("bench", "generate"): bench, ("bench", "serve"): bench,
          ("bench", "eval"): bench}


def leaves(parser: argparse.ArgumentParser, prefix=()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every runnable (innermost) subcommand parser under `parser`, by its command path."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix: parser}
    return {path: p for name, sub in subs[0].choices.items() for path, p in leaves(sub, (*prefix, name)).items()}


def standalone(register) -> argparse.ArgumentParser:
    """A `medtune` parser holding only what one registrar adds."""
    parser = argparse.ArgumentParser(prog="medtune")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_each_module_registers_the_parsers_it_handles():
    seen: dict[tuple[str, ...], object] = {}
    for register in REGISTRARS:
        for path, parser in leaves(standalone(register)).items():
            assert path not in seen, f"{' '.join(path)} registered twice"
            seen[path] = parser.get_default("func")
    assert set(seen) == set(OWNERS)
    for path, func in seen.items():
        assert func.__module__ == OWNERS[path].__name__, f"{' '.join(path)} is answered by {func.__module__}"


@pytest.mark.parametrize("path", OWNERS, ids=" ".join)
def test_a_module_alone_gives_its_subcommand_help(path, capsys):
    register = next(r for r in REGISTRARS if path in leaves(standalone(r)))
    with pytest.raises(SystemExit) as exc:
        standalone(register).parse_args([*path, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: medtune {' '.join(path)}")


# ---- flags → options -------------------------------------------------------------------------------------------

def test_args_for_takes_named_flags_then_the_given_values():
    def target(model, *, limit=None, device="auto", **rest):
        pass

    args = argparse.Namespace(model="m", limit=3, json="out.json", device="cpu")
    assert names_of(target) == ["model", "limit", "device"]
    assert args_for(target, args, device="cuda") == {"model": "m", "limit": 3, "device": "cuda"}
    assert options_from_args(EvalOptions, args, tasks=["medqa"]) == EvalOptions(model="m", tasks=["medqa"], limit=3,
                                                                                  device="cpu")


def test_every_eval_flag_is_an_eval_option_or_the_commands_own():
    parser = leaves(standalone(evaluate.register))[("eval",)]
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests - set(names_of(EvalOptions)) == set(evaluate.COMMAND_ONLY)


class Called(Exception):
    """Raised by a stand-in instead of doing the work: carries the call's arguments."""


def stop_at(monkeypatch, owner, name: str) -> None:
    real = getattr(owner, name)

    @functools.wraps(real)  # keeps the signature args_for reads
    def record(*args, **kwargs):
        raise Called(args, kwargs)

    monkeypatch.setattr(owner, name, record)


def call_of(argv: list[str]) -> tuple[tuple, dict]:
    with pytest.raises(Called) as exc:
        main(argv)
    return exc.value.args


def test_eval_flags_build_the_options_the_hand_copy_built(monkeypatch):
    stop_at(monkeypatch, evaluate.suite, "run_eval")
    argv = ["eval", "m", "--task", "medqa,rouge", "--task", "perplexity", "--data", "medqa=a.jsonl", "--data",
            "rouge=b.jsonl", "--fewshot", "2", "--fewshot-data", "medqa=s.jsonl", "--limit", "5", "--batch-size", "3",
            "--compare-base", "--bootstrap", "50", "--json", "o.json", "--no-save", "--all-tokens", "--window", "64",
            "--stride", "32", "--max-new-tokens", "9", "--recipe", "r.yaml", "--set", "data.format=qa", "--set",
            "x=1", "--judge", "http://j/v1", "--judge-model", "jm", "--judge-key", "k", "--judge-timeout", "5",
            "--precision", "fp32", "--device", "cpu"]
    assert call_of(argv) == ((EvalOptions(
        model="m", tasks=["medqa", "rouge", "perplexity"], data={"medqa": "a.jsonl", "rouge": "b.jsonl"},
        recipe="r.yaml", overrides=["data.format=qa", "x=1"], fewshot=2, fewshot_data={"medqa": "s.jsonl"}, limit=5,
        batch_size=3, compare_base=True, all_tokens=True, window=64, stride=32, max_new_tokens=9, bootstrap=50,
        precision="fp32", device="cpu", judge_url="http://j/v1", judge_model="jm", judge_key="k",
        judge_timeout=5.0),), {})
    # no flags: the dataclass's own defaults
    assert call_of(["eval", "m", "--task", "medqa"]) == ((EvalOptions(model="m", tasks=["medqa"]),), {})


def test_gate_flags_reach_the_config_and_the_run(monkeypatch):
    stop_at(monkeypatch, evaluate.gate, "gate_config")
    argv = ["gate", "RUN", "--config", "g.yaml", "--data", "medqa=x.jsonl", "--limit", "4", "--bootstrap", "99",
            "--batch-size", "2", "--precision", "bf16", "--device", "cpu"]
    assert call_of(argv) == (("RUN",), {"config": "g.yaml", "data": ["medqa=x.jsonl"], "limit": 4, "bootstrap": 99})
    cfg = object()
    monkeypatch.setattr(evaluate.gate, "gate_config", lambda *a, **kw: cfg)
    stop_at(monkeypatch, evaluate.gate, "run_gate")
    assert call_of(argv) == (("RUN", cfg), {"command": command_line(), "batch_size": 2, "precision": "bf16",
                                            "device": "cpu"})


def test_serve_flags_reach_run_server(monkeypatch):
    stop_at(monkeypatch, serve.app, "run_server")
    argv = ["serve", "m", "--adapter", "a=runs/a", "--host", "0.0.0.0", "--port", "9", "--allow-no-key",
            "--max-body-bytes", "10", "--max-queue", "2", "--max-tokens", "3", "--max-batch", "1", "--device", "cpu"]
    want = {"host": "0.0.0.0", "port": 9, "api_key": None, "allow_no_key": True, "max_body_bytes": 10,
            "max_queue": 2, "max_tokens": 3, "max_batch": 1, "device": "cpu"}
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert call_of(argv) == (("m", ["a=runs/a"]), want)
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert call_of(argv) == (("m", ["a=runs/a"]), {**want, "api_key": "from-env"})
    assert call_of([*argv, "--api-key", "flag"]) == (("m", ["a=runs/a"]), {**want, "api_key": "flag"})
    assert call_of(["serve", "m"])[0] == ("m", [])


SHIPPING = {
    "ui": (ui.web, "launch_ui", ["ui", "RUN", "--host", "h", "--port", "1", "--share", "--system", "s", "--template",
                             "chatml", "--device", "cpu"],
           (("RUN",), {"host": "h", "port": 1, "share": True, "device": "cpu", "template": "chatml", "system": "s"})),
    "merge": (export.merge, "merge_run", ["merge", "RUN", "--out", "o", "--dtype", "fp16"],
              ((), {"run": "RUN", "out": "o", "dtype": "fp16"})),
    "export": (export.gguf, "export_gguf", ["export", "RUN", "--quant", "q8_0", "--out", "m.gguf"],
               (("RUN",), {"out": "m.gguf", "quant": "q8_0"})),
    "push": (export.push, "push_run", ["push", "RUN", "--repo-id", "o/n", "--merged", "--dtype", "fp32", "--private",
                                  "--base-model", "b/m"],
             ((), {"run": "RUN", "repo_id": "o/n", "merged": True, "private": True, "dtype": "fp32",
                   "base_model": "b/m"})),
    "generate": (generate.gen, "load_for_inference", ["generate", "m", "--prompt", "p", "--template", "llama2",
                                                      "--device", "cpu"],
                 (("m",), {"device": "cpu", "precision": "auto", "template": "llama2", "for_decoding": True})),
}


@pytest.mark.parametrize("case", SHIPPING)
def test_shipping_flags_reach_their_function(case, monkeypatch):
    owner, name, argv, want = SHIPPING[case]
    stop_at(monkeypatch, owner, name)
    assert call_of(argv) == want


def bench_cases() -> dict:
    cmd = command_line()
    return {
        "train": (train_speed, "bench_config", ["bench", "train", "--steps", "5", "--model", "m", "--data", "d",
                                                "--quick", "--json", "o", "--max-length", "64", "--batch-size", "2",
                                                "--systems", "medtune"],
                  ((), {"steps": 5, "model": "m", "data": "d", "quick": True, "max_length": 64, "batch_size": 2,
                        "systems": "medtune"})),
        "scale": (scale, "scale_config", ["bench", "scale", "--widths", "135m", "--methods", "lora", "--lengths",
                                          "256", "--steps", "4", "--quick"],
                  ((), {"widths": "135m", "methods": "lora", "lengths": "256", "steps": 4, "quick": True})),
        "generate": (generate_speed, "run_bench", ["bench", "generate", "--model", "m", "--max-new-tokens", "7",
                                                   "--systems", "medtune, gguf", "--gguf", "g.gguf", "--gguf-quant",
                                                   "q8_0", "--json", "o"],
                     ((), {"model": "m", "max_new_tokens": 7, "systems": ("medtune", "gguf"), "gguf": "g.gguf",
                           "gguf_quant": "q8_0", "json_path": "o", "command": cmd})),
        "serve": (serve_load, "run_serve_bench", ["bench", "serve", "m", "--adapter", "a=r", "--clients", "2",
                                                  "--seconds", "1.5", "--max-tokens", "8", "--max-batch", "1",
                                                  "--schemathesis-examples", "0", "--json", "o"],
                  ((), {"model": "m", "adapters": ["a=r"], "clients": 2, "seconds": 1.5, "max_tokens": 8,
                        "max_batch": 1, "schemathesis_examples": 0, "json_path": "o", "command": cmd})),
        "eval": (eval_speed, "run_bench", ["bench", "eval", "--task", "medqa", "--data", "d", "--limit", "0",
                                           "--systems", "medtune", "--medsafety-data", "s", "--medsafety-limit", "3",
                                           "--batch-size", "4", "--precision", "fp32", "--json", "o"],
                 ((EvalBenchConfig(model=EvalBenchConfig.model, task="medqa", data="d", limit=None,
                                   systems=("medtune",), batch_size=4, precision="fp32", medsafety_data="s",
                                   medsafety_limit=3),), {"json_path": "o", "command": cmd})),
    }


@pytest.mark.parametrize("case", ["train", "scale", "generate", "serve", "eval"])
def test_bench_flags_reach_their_config(case, monkeypatch):
    owner, name, argv, want = bench_cases()[case]
    stop_at(monkeypatch, owner, name)
    assert call_of(argv) == want

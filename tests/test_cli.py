"""The `medtune` command line, driven in-process through `medtune.cli.main` (plus the installed console script
for the exit-code contract and for Ctrl-C / SIGTERM during training)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe

import medtune.generate
from medtune.cli import build_parser, main
from medtune.commands.common import print_side_by_side
from medtune.generate import generate, load_for_inference
from medtune.recipe import load_recipe
from medtune.run.card import NOT_FACT_CHECKED, results
from medtune.sidebyside import side_by_side
from medtune.train import job
from medtune.train.job import run_training

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
MEDTUNE = REPO / ".venv" / "bin" / "medtune"
COMMANDS = {"train", "data", "generate", "chat", "compare"}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MEDTUNE_HOME=os.environ["MEDTUNE_HOME"],
               WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny LoRA run: conftest's, 2 steps, packed, a loss logged every 10 steps."""
    out = tmp_path_factory.mktemp("cli-run") / "tiny"
    result = run_training(tiny_recipe(tiny_model_dir, out, "train.max_steps=2", "train.logging_steps=10",
                                      "train.packing=true"))
    assert result.metrics["steps"] == 2
    return result.run_dir


# ---- help -------------------------------------------------------------------------------------------------------

def _command_paths(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[str, ...]]:
    """Every (nested) subcommand of the parser, e.g. ("train",), ("data",), ("data", "check")."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((*prefix, name))
                out += _command_paths(sub, (*prefix, name))
    return out


COMMAND_PATHS = _command_paths(build_parser())


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    top = {p[0] for p in COMMAND_PATHS}
    assert COMMANDS <= top
    for name in top:
        assert re.search(rf"^\s+{re.escape(name)}\s", out, re.M), f"`medtune --help` does not list {name}:\n{out}"


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=" ".join)
def test_every_subcommand_help_exits_0(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: medtune {' '.join(path)}"), out[:200]


def test_train_help_lists_nested_recipe_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("lora.r", "train.max_steps", "data.path", "quant.load_in_4bit", "samples.prompts"):
        assert re.search(rf"^\s+{re.escape(key)} = ", out, re.M), f"`train --help` does not list {key}"


# ---- user errors: exit 2, one line, no traceback ------------------------------------------------------------

def _bad_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "What is gout?", "answer": "A kind of arthritis."}\n'
                    '{"question": "What is acne?", "answer": \n', encoding="utf-8")
    return path


# id -> (argv builder, strings the error line must contain). Builders get (tmp_path, tiny_model_dir, request).
USER_ERRORS = {
    "missing-recipe": (lambda t, m, r: ["train", t / "nope.yaml"], lambda t, m: [str(t / "nope.yaml"), "not found"]),
    "unknown-key": (lambda t, m, r: ["train", QUICKSTART, f"model={m}", "lora.rank=8"],
                    lambda t, m: [str(QUICKSTART), "lora.rank", "unknown recipe key"]),
    "wrong-type": (lambda t, m, r: ["train", QUICKSTART, f"model={m}", "train.max_steps=many"],
                   lambda t, m: [str(QUICKSTART), "train.max_steps", "'many'"]),
    "missing-data": (lambda t, m, r: ["data", "check", QUICKSTART, f"model={m}", f"data.path={t / 'gone.jsonl'}"],
                     lambda t, m: [str(t / "gone.jsonl"), "data.path", "not found"]),
    "malformed-jsonl": (lambda t, m, r: ["data", "check", QUICKSTART, f"model={m}", f"data.path={_bad_jsonl(t)}",
                                         "data.format=qa"],
                        lambda t, m: [str(t / "broken.jsonl"), "row 2", "line 2", "malformed JSON"]),
    "unknown-model": (lambda t, m, r: ["generate", "no-such-org/no-such-model", "--prompt", "hi"],
                      lambda t, m: ["no-such-org/no-such-model", "not found offline", "field 'model'"]),
    "compare-not-a-run": (lambda t, m, r: ["compare", t, "--prompt", "hi"],
                          lambda t, m: [str(t), "run directory"]),
    "prompt-too-long": (lambda t, m, r: ["generate", r.getfixturevalue("run_dir"), "--prompt", "fever " * 300,
                                         "--no-stream"],
                        lambda t, m: ["field 'prompt'", "longer than max_length=128"]),
}


@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_error_exits_2_with_one_line(case, tmp_path, tiny_model_dir, request, capsys):
    make_argv, expected = USER_ERRORS[case]
    argv = make_argv(tmp_path, tiny_model_dir, request)
    capsys.readouterr()  # drop what building the run_dir fixture printed
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("medtune: error: "), lines[0]
    for needle in expected(tmp_path, tiny_model_dir):
        assert needle in lines[0], f"{needle!r} missing from {lines[0]!r}"
    assert "Traceback" not in out + err


def test_console_script_exits_2_on_a_user_error(tmp_path):
    """The installed entry point turns main()'s return value into the process exit code."""
    missing = tmp_path / "nope.yaml"
    proc = subprocess.run([str(MEDTUNE), "train", str(missing)], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"medtune: error: {missing}: recipe file not found"]
    assert proc.stdout == ""


# ---- data check ---------------------------------------------------------------------------------------------

# Not compared: tool caches, and runs/ and bench/out/, where other engineers' training and benchmarks write while
# this test runs (a run written relative to the working directory is caught by the empty-cwd check instead).
_IGNORED_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".hypothesis",
                 "runs", "wandb", "mlruns", "artifacts", "out"}


def repo_files() -> dict[str, int]:
    files = {}
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _IGNORED_DIRS and not d.endswith(".egg-info")]
        for name in names:
            p = Path(root) / name
            try:
                files[str(p.relative_to(REPO))] = p.stat().st_mtime_ns
            except FileNotFoundError:  # another engineer removed it meanwhile
                pass
    return files


def test_data_check_reports_without_writing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a stray runs/ or cache relative to the working directory would land here
    before = repo_files()
    code, out, err = run_cli(capsys, "data", "check", QUICKSTART, f"model={tiny_model_dir}")
    after = repo_files()
    assert code == 0, err
    assert list(cwd.iterdir()) == [], "data check wrote into the working directory"
    terms = REPO / "src" / "medtune" / "demo_data" / "terms.jsonl"
    n_rows = sum(1 for line in terms.read_text(encoding="utf-8").splitlines() if line.strip())
    n_eval = round(n_rows * load_recipe(QUICKSTART).data.eval_ratio)
    assert re.search(rf"^  train: {n_rows - n_eval} rows read, {n_rows - n_eval} kept, \d+ truncated to max_length, "
                     r"dropped: none$", out, re.M), out
    assert re.search(rf"^  eval: {n_eval} rows read, {n_eval} kept, ", out, re.M), out
    assert re.search(r"^  train: \d+ tokens, \d+ carry loss; length min=\d+ p50=\d+ p90=\d+ p99=\d+ max=\d+$", out, re.M), out
    example = out.split("first training example (« » marks the tokens that carry loss):\n", 1)[1]
    prompt, answer = example.split("<|im_start|>assistant\n", 1)
    assert prompt.startswith("<|im_start|>user\nPlease tell me about ") and "«" not in prompt, "prompts carry no loss"
    assert re.match(r"«[^«»]+<\|im_end\|>»\n", answer), "the answer and its stop token carry loss"
    # Other engineers edit sources concurrently; data check must add or touch nothing else.
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p)
                     and not (p.endswith((".py", ".md")) and p.startswith(("src/", "tests/"))))
    assert not changed, f"data check wrote into the repo: {changed}"


# ---- generate / compare / chat on a trained run ---------------------------------------------------------------

def expected_answer(model: str | Path, messages: list[dict], max_new_tokens: int, **kw) -> str:
    return generate(load_for_inference(str(model), for_decoding=True), messages, max_new_tokens=max_new_tokens, **kw)


def test_generate_from_run(run_dir, capsys):
    code, out, err = run_cli(capsys, "generate", run_dir, "--prompt", "What is gout?", "--max-new-tokens", "5",
                             "--no-stream")
    assert code == 0, err
    want = expected_answer(run_dir, [{"role": "user", "content": "What is gout?"}], 5)
    assert want, "the tiny tuned model answered nothing; pick another prompt"
    assert out.strip() == want


def test_generate_streams_the_same_text(run_dir, capsys):
    code, out, err = run_cli(capsys, "generate", run_dir, "--prompt", "What is gout?", "--max-new-tokens", "5")
    assert code == 0, err
    assert out.strip() == expected_answer(run_dir, [{"role": "user", "content": "What is gout?"}], 5)


def test_generate_from_base_model_folder(tiny_model_dir, capsys):
    # The untrained tiny model's greedy answer is only newlines, so sample (seeded) to get visible text.
    torch.manual_seed(0)
    code, out, err = run_cli(capsys, "generate", tiny_model_dir, "--prompt", "What is gout?", "--max-new-tokens", "5",
                             "--temperature", "1", "--top-p", "1", "--no-stream")
    assert code == 0, err
    torch.manual_seed(0)
    want = expected_answer(tiny_model_dir, [{"role": "user", "content": "What is gout?"}], 5, temperature=1.0)
    assert want and out.strip() == want


def test_compare_prints_base_and_tuned_for_each_prompt(run_dir, capsys):
    code, out, err = run_cli(capsys, "compare", run_dir, "--prompt", "What is gout?", "--prompt", "What is acne?",
                             "--max-new-tokens", "4")
    assert code == 0, err
    blocks = out.split("\n### ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["What is gout?", "What is acne?"]
    for block in blocks:
        header = block.splitlines()[1]
        assert header.startswith("BASE") and header.endswith("| TUNED"), block


def test_compare_passes_the_repetition_flags(run_dir, capsys, monkeypatch):
    seen = []
    real_generate = medtune.generate.generate
    monkeypatch.setattr(medtune.generate, "generate", lambda *a, **kw: seen.append(kw) or real_generate(*a, **kw))
    code, _, err = run_cli(capsys, "compare", run_dir, "--prompt", "What is gout?", "--max-new-tokens", "4",
                           "--repetition-penalty", "1.5", "--no-repeat-ngram-size", "2")
    assert code == 0, err
    assert [(kw["repetition_penalty"], kw["no_repeat_ngram_size"]) for kw in seen] == [(1.5, 2), (1.5, 2)]
    seen.clear()
    code, _, err = run_cli(capsys, "generate", run_dir, "--prompt", "What is gout?", "--max-new-tokens", "4")
    assert code == 0, err
    assert "repetition_penalty" not in seen[0] and "no_repeat_ngram_size" not in seen[0]  # generate's defaults


def test_chat_reset_and_exit(run_dir, capsys, monkeypatch):
    said = iter(["hello", "/reset", "hi", "/exit"])
    asked, histories, answers = [], [], []
    real_generate = medtune.generate.generate

    def fake_input(prompt=""):
        asked.append(prompt)
        return next(said)

    def spy_generate(loaded, messages, **kw):
        histories.append([dict(m) for m in messages])
        answers.append(real_generate(loaded, messages, **kw))
        return answers[-1]

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(medtune.generate, "generate", spy_generate)
    torch.manual_seed(0)  # sampled, so the tiny model's answers are visible text (its greedy ones are blank)
    code, out, err = run_cli(capsys, "chat", run_dir, "--max-new-tokens", "6", "--temperature", "1", "--top-p", "1")
    assert code == 0, err
    assert len(asked) == 4, "chat must keep reading until /exit"
    assert out.splitlines()[0].startswith("medtune chat: not medical advice.")
    # /reset cleared the conversation: "hi" is sent alone, without the "hello" exchange.
    assert histories == [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "hi"}]]
    before, after = out.split("(conversation cleared)")
    assert before.count("model> ") == 1 and after.count("model> ") == 1, out
    for printed, answer in zip((before, after), answers, strict=True):
        assert answer and printed.split("model> ", 1)[1].strip() == answer, (printed, answer)


def test_chat_ends_on_eof(run_dir, capsys, monkeypatch):
    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    code, out, _ = run_cli(capsys, "chat", run_dir)
    assert code == 0 and "model> " not in out


# ---- Ctrl-C and SIGTERM during training -------------------------------------------------------------------------

def _first_train_step(metrics: Path, proc: subprocess.Popen, timeout: float) -> int:
    """Poll metrics.jsonl until a training-step row (with "loss") appears; the step-0 base eval row does not count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited early with code {proc.returncode}")
        if metrics.is_file():
            for line in metrics.read_text(encoding="utf-8").splitlines():
                if line.endswith("}") and '"loss"' in line:
                    return json.loads(line)["step"]
        time.sleep(0.2)
    pytest.fail(f"no training step logged in {metrics} within {timeout} s")


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_and_resume_finishes(signum, code, tiny_model_dir, tmp_path, capsys):
    if sys.platform == "win32":
        pytest.skip("POSIX signals")
    out_dir = tmp_path / "run"
    argv = [str(QUICKSTART), f"model={tiny_model_dir}", f"output_dir={out_dir}", "train.max_steps=100000",
            "train.save_steps=0", "samples.prompts=[]", "train.logging_steps=1", "data.max_length=128"]
    log_out, log_err = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([str(MEDTUNE), "train", *argv], stdout=log_out, stderr=log_err, env=subprocess_env(),
                            cwd=tmp_path)
    try:
        _first_train_step(out_dir / "metrics.jsonl", proc, timeout=120)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == code, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_out.close()
        log_err.close()
    stdout = (tmp_path / "stdout.txt").read_text()
    m = re.search(r"interrupted at step (\d+)/100000; checkpoint (\S+)", stdout)
    assert m, stdout
    step = int(m.group(1))
    assert f"resume with: medtune train <recipe> output_dir={out_dir} resume=true" in stdout
    ckpts = sorted((out_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == [f"step-{step:07d}"], "one complete checkpoint, no .tmp leftovers"
    assert Path(m.group(2)) == ckpts[0]
    assert {"adapter_model.safetensors", "training.pt", "trainer_state.json"} <= {p.name for p in ckpts[0].iterdir()}
    assert json.loads((ckpts[0] / "trainer_state.json").read_text())["step"] == step

    rc, out, err = run_cli(capsys, "train", *argv, "resume=true", f"train.max_steps={step + 2}")
    assert rc == 0, err
    assert f"trained {step + 2} steps" in out
    final = json.loads((out_dir / "metrics_final.json").read_text())
    assert final["steps"] == step + 2
    loss_steps = [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
    assert loss_steps[-2:] == [step + 1, step + 2], loss_steps


# ---- the side-by-side and the figures `medtune train` prints ------------------------------------------------------

LONG = ("Gout is a form of inflammatory arthritis caused by urate crystals in a joint, often the big toe; attacks "
        "come on suddenly with pain, swelling and redness, and they are treated with anti-inflammatory drugs.")


@pytest.mark.parametrize("width", [80, 100, 123, 40])
def test_side_by_side_fits_the_terminal_width(width, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(width))
    print_side_by_side([{"prompt": "What is gout? " * 8, "base": LONG, "tuned": LONG.upper(),
                          "reference": "A painful joint disease caused by uric acid crystals."}])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= width, out
    flat = " ".join(out.split())
    assert NOT_FACT_CHECKED in flat  # said plainly, next to the answers
    assert "REFERENCE (held-out answer): A painful joint disease caused by uric acid crystals." in flat
    if width >= 51:  # two columns of at least 24
        assert re.search(r"^BASE +\| TUNED$", out, re.M)
    else:
        assert "\nBASE:\n" in out and "\nTUNED:\n" in out


def test_side_by_side_keeps_every_word_in_its_column():
    text = side_by_side([{"prompt": "p", "base": LONG, "tuned": "Short."}], width=80)
    lines = text.splitlines()
    rows = lines[lines.index("-" * 38 + "-+-" + "-" * 38) + 1:]  # under the header's rule
    col = (80 - 3) // 2
    assert " ".join(r[:col].strip() for r in rows).split() == LONG.split()
    assert " ".join(r[col + 3:].strip() for r in rows).split() == ["Short."]


def test_train_prints_the_perplexity_the_card_shows(monkeypatch, capsys, tmp_path):
    metrics = {"steps": 10, "train_seconds": 3.0, "tokens_per_s": 100.0, "train_loss": 2.0, "base_eval_ppl": 15.544,
               "eval_ppl": 8.4173, "base_eval_loss": 2.74, "eval_loss": 2.13}
    monkeypatch.setattr(job, "run_training", lambda recipe, force=False: job.TrainResult(tmp_path, metrics, []))
    code, out, err = run_cli(capsys, "train", QUICKSTART)
    assert code == 0, err
    assert "held-out perplexity: base 15.54 -> tuned 8.417" in out
    assert "| perplexity | 15.54 | 8.417 |" in results(metrics, {})  # the same figures, rounded the same way


def test_train_help_lists_allowed_values(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "One of: adamw, adamw_fused, sgd." in out and "One of: linear, cosine, constant, constant_with_warmup." in out
    assert "One of: tensorboard, wandb, mlflow." in out


# ---- setup and the demo's time (README is the one place) ---------------------------------------------------------

def test_make_setup_shows_progress():
    proc = subprocess.run(["make", "-n", "-B", "setup"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    pip = [line for line in proc.stdout.splitlines() if "pip install" in line]
    assert len(pip) == 3 and not any(re.search(r"\s-q\b|--quiet", line) for line in pip), pip  # pip's own progress
    steps = re.findall(r"medtune setup \[(\d)/4\]", proc.stdout)
    assert steps == ["1", "2", "3", "4"]  # a line per step


def test_demo_time_is_stated_once_and_the_others_point_to_it():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.count("**How long `make demo` takes**") == 1
    assert "2 min 12 s wall after\ninstall, 84 s of it training the 27 steps" in readme
    for path in (REPO / "recipes" / "quickstart.yaml", REPO / "docs" / "speed.md"):
        text = path.read_text(encoding="utf-8")
        assert "How long `make demo` takes" in text, path
        assert not re.search(r"~\s?\d+\s?(min|s)\b", text), path  # was "~5 min" (recipe), "~85 s" (docs)
    assert not re.search(r"~\s?\d+\s?(min|s)\b", readme)  # was "~2 min after install"

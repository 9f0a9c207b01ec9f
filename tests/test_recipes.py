"""Every shipped recipe: it loads, it documents itself (launch command on top, a comment on every knob), and it
trains for 2 optimizer steps on the tiny LLaMA with data of its own format — 4-bit stays on where the recipe
asks for QLoRA, so bitsandbytes on CPU is exercised too."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from safetensors.torch import load_file

from medtune.recipe import load_recipe
from medtune.train.job import run_training

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted([*REPO.glob("recipes/*.yaml"), *REPO.glob("recipes/*.yml")])
SHARED = SHARED_DATA / "train"
COMMENTED_SECTIONS = ("data", "lora", "quant", "train", "eval")

SEED_000 = "llama2-7b-qlora-wiki-terms.yaml"
DOCTOR_CHAT = "llama3-8b-qlora-doctor-chat.yaml"
HOME_REMEDIES = "llama2-7b-chat-qlora-home-remedies.yaml"
MEDQA = "llama3.2-3b-lora-medqa.yaml"
QUICKSTART = "quickstart.yaml"
QUICKSTART_SAFETY = "quickstart-safety.yaml"
MEDSAFETYBENCH = SHARED_DATA / "safety" / "medsafetybench" / "train"


def test_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert {SEED_000, DOCTOR_CHAT, HOME_REMEDIES, MEDQA, QUICKSTART} <= names, names


# ---- the recipe files themselves ------------------------------------------------------------------------------

def trailing_comment(line: str) -> str | None:
    """The text of a YAML comment at the end of `line` (a '#' after whitespace, outside quotes), else None."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[i + 1:].strip()
    return None


def uncommented_knobs(text: str, sections=COMMENTED_SECTIONS) -> list[str]:
    """`key: value` lines directly inside `sections` that lack a trailing `# comment`, as "line N: text".

    Blank lines, comment-only lines, list items (`- x`) and continuation lines (indented deeper than the
    section's keys: block scalars, nested mappings) are not knobs."""
    missing = []
    section, key_indent = None, None
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent == 0:
            m = re.match(r"([\w.-]+)\s*:", line)
            section, key_indent = (m.group(1) if m else None), None
            continue
        if section not in sections or stripped.startswith("- "):
            continue
        if key_indent is None:
            key_indent = indent
        if indent > key_indent:
            continue  # continuation of the knob above
        if re.match(r"[\w.-]+\s*:", stripped) and not trailing_comment(line):
            missing.append(f"line {n}: {stripped}")
    return missing


def test_knob_checker_catches_what_it_should():
    text = ("# Run: medtune train recipes/x.yaml\nname: x\n"
            "data:\n  path: a.jsonl   # where\n  format: text\n  prompt_template: \"a # not a comment\"\n"
            "  response_template: >-   # the answer\n    {{ b }} # inside a block scalar\n"
            "  columns:                # renames\n    question: Q\n"
            "lora:\n  target_modules:         # layers\n    - q_proj\n  r: 8 #\n"
            "samples:\n  max_new_tokens: 5\n")
    assert uncommented_knobs(text) == ["line 5: format: text", "line 6: prompt_template: \"a # not a comment\"",
                                       "line 14: r: 8 #"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name
    assert recipe.model


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_starts_with_its_launch_command(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), f"{path.name}: the first line must be a comment with the launch command"
    assert f"medtune train recipes/{path.name}" in first, f"{path.name}: first line is {first!r}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_knob_is_commented(path):
    missing = uncommented_knobs(path.read_text(encoding="utf-8"))
    assert not missing, (f"{path.name}: knobs in {', '.join(COMMENTED_SECTIONS)} without a trailing '# comment' "
                         "explaining their effect:\n  " + "\n  ".join(missing))


# ---- 2 optimizer steps of every recipe on the tiny model ----------------------------------------------------

def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real data not available: {path}")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def wiki_terms_text(tmp: Path) -> list[str]:
    """The seed-000 data shape: Llama-2 formatted strings in a `text` column."""
    rows = []
    with _need(SHARED / "medical_terms.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if len(rows) == 16:
                break
            r = json.loads(line)
            rows.append({"text": f"<s>[INST] Please tell me about {r['page_title']} [/INST] {r['page_text']} </s>"})
    return [f"data.path={_jsonl(tmp / 'wiki_terms_llama2.jsonl', rows)}", "data.format=text", "data.limit=16"]


def doctor_chats(tmp: Path) -> list[str]:
    records = json.loads(_need(SHARED / "genmedgpt5k.json").read_text(encoding="utf-8"))[:16]
    rows = [{"messages": [{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]}
            for r in records]
    return [f"data.path={_jsonl(tmp / 'doctor_chats.jsonl', rows)}", "data.format=messages", "data.limit=16"]


def remedies_csv(tmp: Path) -> list[str]:
    return [f"data.path={_need(SHARED / 'home_remedies.csv')}", "data.limit=16"]


def medqa_instructions(tmp: Path) -> list[str]:
    # Every genmedgpt5k prompt (its fixed instruction + the patient's message) is over 128 tokens with the
    # tiny 600-token BPE vocabulary, so at max_length=128 each row is a "prompt longer than max_length" error.
    return [f"data.path={_need(SHARED / 'genmedgpt5k.json')}", "data.format=instruction", "data.limit=16",
            "data.max_length=256"]


def safety_mix(tmp: Path) -> list[str]:
    """quickstart-safety's sources and gate data at their absolute place (the recipe's are relative to the repo
    root); a 1-item-per-category gate with 4-token answers."""
    root = _need(MEDSAFETYBENCH / "gpt4" / "category_1.csv").parents[1]
    recipe = load_recipe(REPO / "recipes" / QUICKSTART_SAFETY)
    sources = [s.model_dump(exclude_none=True) for s in recipe.data.sources]
    for s in sources:
        s["path"] = s["path"].replace("../shared/data/safety/medsafetybench/train", str(root))
    assert [s["path"] for s in sources] == ["demo:terms", *(f"{root}/gpt4/category_{n}.csv" for n in range(1, 10))]
    return [f"data.sources={json.dumps(sources)}", "data.limit=16", "gate.limit=1", "gate.bootstrap=50",
            f"gate.data={json.dumps({'medsafety': str(root / 'llama2'), 'overrefusal': 'demo:benign'})}",
            "gate.options={max_new_tokens: 4}"]


def own_data(tmp: Path) -> list[str]:
    return ["data.limit=16"]


# (recipe file, case id, data overrides)
CASES: list[tuple[str, str, Callable[[Path], list[str]]]] = [
    (SEED_000, "wiki-terms-text", wiki_terms_text),
    (DOCTOR_CHAT, "doctor-chat-messages", doctor_chats),
    (HOME_REMEDIES, "home-remedies-csv", remedies_csv),
    (HOME_REMEDIES, "home-remedies-demo", own_data),
    (MEDQA, "medqa-instruction", medqa_instructions),
    (QUICKSTART, "quickstart-demo", own_data),
    (QUICKSTART_SAFETY, "quickstart-safety-mix", safety_mix),
]


def _cases():
    covered = {name for name, _, _ in CASES}
    out = [pytest.param(REPO / "recipes" / name, make, id=cid) for name, cid, make in CASES]
    # A new recipe is trained on its own data when that is offline (demo:<name> or a local file); otherwise
    # the test fails and asks for an entry in CASES.
    out += [pytest.param(p, None, id=p.name) for p in RECIPES if p.name not in covered]
    return out


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("path,make_data", _cases())
def test_recipe_trains_two_steps(path, make_data, tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="medtune")
    base = load_recipe(path)
    if make_data is None:
        spec = base.data.path
        if not (spec.startswith("demo:") or Path(spec).exists()):
            pytest.fail(f"{path.name}: its data ({spec}) is not available offline; add a case with local data to CASES")
        make_data = own_data
    has_eval = base.data.eval_ratio > 0 or base.data.eval_path is not None
    overrides = [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
                 "train.logging_steps=1", "samples.max_new_tokens=4", "data.max_length=128", "report_to=[]",
                 *(["train.eval_steps=1"] if has_eval else []), *make_data(tmp_path)]
    recipe = load_recipe(path, overrides)
    assert recipe.quant.load_in_4bit == base.quant.load_in_4bit  # QLoRA stays on where the recipe has it

    result = run_training(recipe)

    run = result.run_dir
    assert result.metrics["steps"] == 2
    adapter = run / "adapter_model.safetensors"
    assert adapter.is_file()
    lora_b = [t for k, t in load_file(adapter).items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b), "LoRA B starts at zero; 2 steps must move every one"
    rows = metric_rows(run)
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in losses] == [1, 2]
    assert all(math.isfinite(v) for _, v in losses), losses
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if has_eval:
        assert [s for s, _ in evals] == [0, 1, 2], "base eval, eval_steps=1, final eval"
        assert all(math.isfinite(v) for _, v in evals), evals
        assert math.isfinite(result.metrics["eval_loss"])
    else:
        assert evals == [] and "eval_loss" not in result.metrics
    model_line = next(r.getMessage() for r in caplog.records if "trainable LoRA parameters" in r.getMessage())
    if recipe.quant.load_in_4bit:
        assert f"QLoRA {recipe.quant.quant_type}" in model_line and "4 bits" in model_line, model_line
        assert json.loads((run / "medtune.json").read_text())["quant"]["load_in_4bit"] is True
    else:
        assert "4 bits" not in model_line, model_line
    report = json.loads((run / "data_report.json").read_text(encoding="utf-8"))
    assert report["train"]["kept"] > 0 and report["example"]
    if path.name == SEED_000:  # pre-formatted text: its own <s> is kept, no second one added; every token trains
        assert report["example"].startswith("«<s>[INST] Please tell me about "), report["example"]
        assert "<s><s>" not in report["example"] and report["example"].endswith("»"), report["example"]
    if path.name == QUICKSTART_SAFETY:  # the demonstrations were mixed in, and the gate ran on the safety axes
        assert sum(s["used"] for p, s in report["sources"].items() if p != "demo:terms") > 0, report["sources"]
        assert [a["axis"] for a in result.gate["axes"]] == [
            "perplexity.perplexity", "medsafety.refusal_rate", "overrefusal.overrefusal_rate"]
        assert result.gate["items"] == {"perplexity": 1, "medsafety": 9, "overrefusal": 11}
    if path.name == HOME_REMEDIES:
        assert "[INST]" in report["example"], report["example"]
        assert "What is a home remedy for" in report["example"], report["example"]


# ---- seed 000's pad_token=eos ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override,warns", [([], True), (["tokenizer.pad_token=auto"], False)],
                         ids=["as-shipped-eos", "pad-auto"])
def test_seed_000_pad_eos_logs_the_risk(override, warns, tiny_tokenizer, tiny_model_dir, caplog):
    from medtune.tokenizer import prepare_tokenizer

    recipe = load_recipe(REPO / "recipes" / SEED_000, [f"model={tiny_model_dir}", *override])
    assert recipe.tokenizer.pad_token == ("eos" if warns else "auto")
    with caplog.at_level(logging.WARNING, logger="medtune"):
        chat = prepare_tokenizer(tiny_tokenizer, recipe.tokenizer)
    risk = [r for r in caplog.records if r.name == "medtune" and r.levelno == logging.WARNING
            and "pad_token=eos" in r.getMessage() and "never to stop" in r.getMessage()]
    assert bool(risk) == warns, [r.getMessage() for r in caplog.records]
    assert (chat.pad_token == tiny_tokenizer.eos_token) == warns

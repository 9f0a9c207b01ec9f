"""The model card, written from a run directory's files: front matter, every section, each figure once, no
absolute local path; rewritten (not appended to) when eval results arrive; the merged model's card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe

from medtune.eval.report import write_run_results
from medtune.eval.results import TaskResult
from medtune.recipe import Recipe
from medtune.run.card import NOT_MEDICAL_ADVICE, license_of, merged_card, write_card
from medtune.run.meta import RunMeta, read_run_meta, versions

SECTIONS = ("Intended use", "Out-of-scope use", "Base model", "Training data", "Recipe", "Results", "Plots",
            "Sample answers", "How to use", "Versions", "Hardware", "Limitations")
METRICS = {"steps": 30, "train_loss": 1.234, "tokens_per_s": 1523.7, "train_seconds": 42.5, "base_eval_loss": 2.5,
           "base_eval_ppl": 12.1825, "eval_loss": 1.5027, "eval_ppl": 4.4937, "eval_tokens": 3210}
# data/hygiene.py's report shape (data_report.json "hygiene")
HYGIENE = {"decontamination": {"checked_against": {"pubmedqa": 500}, "ngram": 13, "contaminated_rows": 3,
                               "action": "drop", "examples": ["notes.jsonl:4 overlaps pubmedqa dev.json:7"]},
           "near_duplicates": {"threshold": 0.8, "duplicate_rows": 7, "action": "report", "examples": []},
           "phi": {"mode": "redact", "counts": {"EMAIL_ADDRESS": 2}, "rows_with_phi": 2, "examples": [],
                   "names": "not scanned"}}


def make_run(root: Path, *, base_model: str = "smollm2-135m-instruct", hygiene: dict | None = None,
             quant: bool = False) -> Path:
    """A run directory as `medtune train` leaves it, with absolute local paths wherever a run has them."""
    run = root / "runs" / "terms-demo"
    (run / "plots").mkdir(parents=True)
    (run / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    data_file = root / "data" / "notes.jsonl"
    recipe = Recipe(model=base_model, data={"path": str(data_file)}, output_dir=str(run)).to_dict()
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    RunMeta(base_model=base_model, base_model_path=str(root / "cache" / "model"), template="chatml",
            stop_tokens=["<|im_end|>"], stop_token_ids=[2], pad_token="<|pad|>", pad_token_id=0, max_length=512,
            quant={"load_in_4bit": quant}, versions=versions(),
            hardware={"device": "cpu: Test CPU", "precision": "fp32"}).write(run)
    part = {"rows": 90, "kept": 88, "truncated": 1, "dropped": {"empty": 2}, "tokens": 12345, "loss_tokens": 6789,
            "length_percentiles": {"p50": 120, "p95": 301}}
    report = {"source": str(data_file), "format": "qa", "max_length": 512, "train": part,
              "eval": {**part, "rows": 10, "kept": 10, "dropped": {}, "tokens": 1400, "loss_tokens": 700},
              "eval_source": f"{data_file} (data.eval_ratio=0.1)", "example": "<|im_start|>user ... «answer»",
              **({"hygiene": hygiene} if hygiene else {})}
    (run / "data_report.json").write_text(json.dumps(report), encoding="utf-8")
    (run / "metrics_final.json").write_text(json.dumps(METRICS), encoding="utf-8")
    samples = [{"prompt": "What is a | pipe?\nBe brief.", "base": "A pipe | is\na tube.", "tuned": "<b>A tube</b>"}]
    (run / "samples.json").write_text(json.dumps(samples), encoding="utf-8")
    return run


def front_matter(text: str) -> dict:
    head, sep, _ = text.removeprefix("---\n").partition("\n---\n")
    assert text.startswith("---\n") and sep
    return yaml.safe_load(head)


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def figures(text: str) -> list[str]:
    """Every decimal figure shown in the Results and Evaluations sections (ints such as item counts excluded)."""
    shown = section(text, "Results") + (section(text, "Evaluations") if "\n## Evaluations\n" in text else "")
    return re.findall(r"(?<![\w.])\d+\.\d+", shown)


def test_card_sections_front_matter_and_no_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path, hygiene=HYGIENE)
    text = write_card(run).read_text()

    assert front_matter(text) == {"library_name": "peft", "license": "apache-2.0", "language": ["en"],
                                  "datasets": ["notes.jsonl"], "tags": ["medtune", "lora", "medical"],
                                  "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    for title in SECTIONS:
        assert f"\n## {title}\n" in text
    assert f"> **{NOT_MEDICAL_ADVICE}**" in text and text.index(NOT_MEDICAL_ADVICE) < text.index("## Intended use")
    assert "diagnosis" in section(text, "Out-of-scope use").lower()
    assert "emergenc" in section(text, "Out-of-scope use").lower()
    assert str(tmp_path) not in text and not re.search(r"(?<![\w.])/(home|tmp|root|work|Users)/", text)

    data = section(text, "Training data")
    assert "- Source: `notes.jsonl` (format qa, max_length 512)" in data
    assert "| train | 90 | 88 | 1 | 2 empty | 12345 | 6789 | p50=120 p95=301 |" in data
    assert "benchmark overlap (13-gram): 3 rows (dropped) against pubmedqa (500 items)" in data
    assert "near-duplicates (Jaccard >= 0.8): 7 rows (kept)" in data
    assert "PHI (redact): 2 rows with identifiers: 2 EMAIL_ADDRESS" in data
    assert "| `data.path` | notes.jsonl |" in text
    assert "| `lora.r` |" not in text  # a default: the card lists only the keys that differ from the defaults

    results = section(text, "Results")
    assert "| final train loss | 1.234 |" in results and "| tokens per second | 1,524 |" in results
    assert "| perplexity | 12.18 | 4.494 |" in results and "| loss (nats per token) | 2.5 | 1.503 |" in results
    assert "Held-out data (3,210 tokens)" in results
    figs = figures(text)
    assert len(figs) == len(set(figs)) == 6  # train loss, train seconds, base/tuned loss, base/tuned perplexity

    versions_ = section(text, "Versions")
    for package in ("medtune", "torch", "transformers", "peft", "trl", "bitsandbytes"):
        assert f"| {package} | " in versions_
    from importlib.metadata import version

    assert f"| torch | {version('torch')} |" in versions_
    assert "- Device: cpu: Test CPU\n- Precision: fp32" in section(text, "Hardware")
    assert "![loss](plots/loss.png)" in text
    assert "> What is a | pipe?\n> Be brief." in text
    assert "| base model | tuned model |\n|---|---|\n| A pipe \\| is<br>a tube. | &lt;b&gt;A tube&lt;/b&gt; |" in text
    assert ('PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct"), '
            '"runs/terms-demo")') in text
    assert 'medtune generate runs/terms-demo --prompt "' in text and "medtune chat runs/terms-demo" in text


def test_no_hygiene_table_without_hygiene(tmp_path):
    text = write_card(make_run(tmp_path)).read_text()
    assert "hygiene" not in text.lower()


def test_eval_results_replace_the_section_and_each_figure_shows_once(tmp_path):
    run = make_run(tmp_path)
    write_card(run)
    ppl = TaskResult("perplexity", {"perplexity": 4.4937, "loss": 1.5027, "tokens": 3210, "n": 10},
                     base={"perplexity": 12.1825, "loss": 2.5, "tokens": 3210, "n": 10},
                     delta={"perplexity": {"delta": -7.6888, "ci_low": -9.1234, "ci_high": -6.0321, "significant": True, "better": True,
                                           "n": 10}})
    acc = TaskResult("pubmedqa", {"acc": 0.52, "acc_stderr": 0.0223, "n": 500})
    for _ in range(2):
        write_run_results(run, [ppl, acc], model=str(run))
    text = (run / "README.md").read_text()
    assert text.count("\n## Evaluations\n") == 1 and text.index("## Evaluations") < text.index("## Plots")
    evals = section(text, "Evaluations")
    assert "| perplexity | perplexity | 12.18 | 4.494 | -7.689 [-9.123, -6.032] |" in evals
    assert "| pubmedqa | acc |  | 0.52 ± 0.0223 |  |" in evals
    assert "Held-out perplexity: see Evaluations." in section(text, "Results")
    figs = figures(text)
    assert len(figs) == len(set(figs))
    assert str(tmp_path) not in text


@pytest.mark.parametrize(("base_model", "hub_id", "license_"), [
    ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "llama3.2"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
    ("NousResearch/Llama-2-7b-chat-hf", "NousResearch/Llama-2-7b-chat-hf", "llama2"),
    ("local/model", None, "other"),  # an existing folder, though it looks like org/name
    ("/abs/folder", None, "other"),
])
def test_front_matter_base_model_and_license(tmp_path, monkeypatch, base_model, hub_id, license_):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "model").mkdir(parents=True)
    text = write_card(make_run(tmp_path, base_model=base_model, quant=True)).read_text()
    front = front_matter(text)
    assert front.get("base_model") == hub_id and front["license"] == license_ == license_of(base_model)
    assert front["tags"] == ["medtune", "qlora", "medical"] and "QLoRA adapter" in text
    assert "/abs/" not in text


def test_merged_card_keeps_the_run_card_under_transformers_front_matter(tmp_path):
    run = make_run(tmp_path)
    write_card(run)
    text = merged_card(run, "bf16")
    front = front_matter(text)
    assert front["library_name"] == "transformers" and front["tags"] == ["medtune", "medical", "merged"]
    assert front["license"] == "apache-2.0" and "Merged model" in text and NOT_MEDICAL_ADVICE in text
    assert "\n## Training data\n" in text and text.count(NOT_MEDICAL_ADVICE) == 3  # note, top notice, limitations


def test_meta_round_trip_and_a_missing_field(tmp_path):
    run = make_run(tmp_path)
    meta = read_run_meta(run)
    assert meta.base_model == "smollm2-135m-instruct" and meta.stop_token_ids == [2] and meta.adapter_kind == "LoRA"
    data = json.loads((run / "medtune.json").read_text())
    del data["pad_token_id"]
    (run / "medtune.json").write_text(json.dumps({**data, "from_a_newer_medtune": 1}))
    from medtune.errors import MedtuneError

    with pytest.raises(MedtuneError, match="pad_token_id"):
        read_run_meta(run)


# ---- what a new user reads first (issue 14) ------------------------------------------------------------------------

@pytest.mark.parametrize("template, saved, shown", [
    ("chatml", None, "`chatml` (shipped with medtune)"),
    ("tokenizer", "{{ '<|im_start|>' + m['role'] }}", "the base model tokenizer's own, ChatML layout"),
    ("tokenizer", "{{ '<|start_header_id|>' + m['role'] }}", "the base model tokenizer's own, Llama 3 layout"),
    ("tokenizer", "{{ m['role'] + ': ' }}", "the base model tokenizer's own (not a layout medtune knows by name)"),
    ("/home/me/tpl.jinja", "[INST] {{ m['content'] }}", "the file `tpl.jinja`, Llama 2 layout"),
])
def test_card_names_the_chat_template(tmp_path, template, saved, shown):
    import dataclasses

    run = make_run(tmp_path)
    dataclasses.replace(read_run_meta(run), template=template).write(run)
    if saved:
        (run / "chat_template.jinja").write_text(saved)
    base = section(write_card(run).read_text(), "Base model")
    assert f"- Chat template: {shown}, stops on `<|im_end|>`" in base


def test_card_recipe_lists_only_keys_that_differ_from_defaults(tmp_path):
    run = make_run(tmp_path)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["train"]["warmup_steps"] = 3
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    rows = re.findall(r"^\| `([\w.]+)` \| (.*) \|$", section(write_card(run).read_text(), "Recipe"), re.M)
    assert sorted(rows) == [("data.path", "notes.jsonl"), ("output_dir", "terms-demo"), ("train.warmup_steps", "3")]


def test_card_sample_answers_are_marked_not_fact_checked_with_the_reference(tmp_path):
    from medtune.run.card import NOT_FACT_CHECKED

    run = make_run(tmp_path)
    samples = [{"prompt": "What is gout?", "base": "A toe.", "tuned": "Gout is a type of acute pancreatitis.",
                "reference": "Gout is arthritis caused by urate crystals."},
               {"prompt": "Be brief.", "base": "Ok.", "tuned": "Ok!"}]
    (run / "samples.json").write_text(json.dumps(samples))
    text = section(write_card(run).read_text(), "Sample answers")
    assert text.lstrip().startswith(f"> **Not fact-checked.** {NOT_FACT_CHECKED}\n")
    assert ("| base model | tuned model | reference (held-out answer) |\n|---|---|---|\n| A toe. | Gout is a type of "
            "acute pancreatitis. | Gout is arthritis caused by urate crystals. |") in text
    assert "| base model | tuned model |\n|---|---|\n| Ok. | Ok! |" in text  # a recipe prompt has no reference


@pytest.fixture(scope="module")
def warm_run(tiny_model_dir, tmp_path_factory):
    """5 steps, 3 of them warm-up, logging every 10: the regular log alone would show no warm-up at all."""
    from medtune.train.job import run_training

    out = tmp_path_factory.mktemp("warm") / "run"
    return run_training(tiny_recipe(tiny_model_dir, out, "data.limit=16", "data.max_length=96", "train.warmup_steps=3",
                                    "train.logging_steps=10", "train.lr=1e-3", "train.packing=true", "lora.dropout=0.05",
                                    "samples.from_eval=1", "samples.max_new_tokens=4", "report_to=[]"))


def test_learning_rate_is_logged_from_step_0_through_the_warm_up(warm_run):
    rows = [json.loads(line) for line in (warm_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    lr = [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]
    assert [s for s, _ in lr] == [0, 1, 2, 3, 5]
    assert [v for _, v in lr] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3, 0.0])  # linear warm-up, linear decay


def test_finished_run_card_plots_loss_first_and_leaves_no_lock(warm_run):
    run = warm_run.run_dir
    assert not (run / ".medtune.lock").exists()
    text = (run / "README.md").read_text()
    plots = re.findall(r"!\[[^\]]*\]\(plots/(\w+)\.png\)", section(text, "Plots"))
    assert plots[0] == "loss" and set(plots) == {"loss", "perplexity", "learning_rate", "grad_norm"}
    assert "- Chat template: `chatml` (shipped with medtune)" in text
    (sample,) = warm_run.samples
    assert sample["reference"] and f"| {sample['reference']} |" in section(text, "Sample answers")

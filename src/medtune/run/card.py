"""The model card (RUN/README.md): the one writer, rebuilt whole from the run directory's files each time.

`medtune train` writes it when training ends; `medtune eval` (and eval.after_train) rewrites it after adding
RUN/eval/*.json, `medtune gate` (and eval.gate) after writing RUN/gate.json; `medtune merge` turns it into the merged model's card. Each section is one function of the
run's files (meta, recipe, data report, final metrics, samples, plots, eval results, gate), so every figure is shown
once, and the card names no local absolute path: a local model or data file appears by its file name only.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from medtune.data.hygiene import hygiene_lines, redact_identifiers
from medtune.model_names import hub_id_of
from medtune.recipe import Recipe
from medtune.run.layout import CARD, DATA_REPORT, EVAL, GATE, GATE_PLOT, METRICS_FINAL, PLOTS, RECIPE, SAMPLES
from medtune.run.meta import RunMeta, read_run_meta
from medtune.run.metrics import flatten
from medtune.tokenizer import SHIPPED_TEMPLATES, template_layout

NOT_MEDICAL_ADVICE = ("This model is a research artifact. It is not medical advice and must not be used to diagnose, "
                      "treat or make decisions about anyone's health.")
NOT_FACT_CHECKED = ("These answers are not fact-checked: nobody verified them, and the perplexity verdict measures how "
                    "well the model fits the style of its data, not whether an answer is true. Compare them with the "
                    "reference answer where one is shown.")
_PLOT_ORDER = ("loss", "perplexity", "learning_rate", "grad_norm")  # loss first; any other plot after these
# (pattern in the lower-cased hub id, Hub licence id), first match wins
_LICENSES = [("smollm", "apache-2.0"), ("llama-3.2", "llama3.2"), ("llama-3", "llama3"), ("llama-2", "llama2")]
_EVAL_SHOWN = ("acc", "acc_norm", "ece", "brier", "perplexity", "loss", "tokens", "rougeL", "bleu", "score",
               "refusal_rate", "overrefusal_rate", "harmfulness", "agree_rate", "abstain_rate", "answered_acc", "aurc",
               "acc_at_50", "acc_at_80")
_HELD_OUT = [("eval_loss", "loss (nats per token)"), ("eval_ppl", "perplexity")]
_TRAINING = [("steps", "optimizer steps"), ("train_loss", "final train loss"), ("tokens_per_s", "tokens per second"),
             ("train_seconds", "training seconds"), ("skipped_batches", "skipped batches")]

_INTENDED_USE = """\
Research and teaching: studying how LoRA/QLoRA fine-tuning on medical text changes a small language model, comparing
it with its base model, and drafting text that a qualified person reviews."""

_OUT_OF_SCOPE = """\
- Diagnosis, triage or treatment decisions, medication dosing, or any other clinical decision about a person.
- Emergencies: call your local emergency number instead.
- Answering patients or the public without review by a qualified clinician.
- Any use where a wrong, outdated or invented answer could harm someone."""

_LIMITATIONS = f"""\
- {NOT_MEDICAL_ADVICE}
- It can state wrong, outdated or dangerous things fluently and with confidence. Nothing here was reviewed by clinicians.
- Held-out perplexity measures how well the model fits the style of the training data, not whether its answers are true.
- It inherits the biases and gaps of its base model and of the training data (see Training data).
- This is an adapter: it only works on top of the exact base model named above."""


def write_card(run_dir: str | Path) -> Path:
    """(Re)write RUN/README.md from the run directory's files."""
    out = Path(run_dir) / CARD
    out.write_text(render_card(run_dir), encoding="utf-8")
    return out


def render_card(run_dir: str | Path, *, repo_id: str | None = None, base_hub_id: str | None = None) -> str:
    """The card of a run; `medtune push` passes the Hub repository it uploads to (then named in "How to use") and
    the base model's hub id (for a run trained from a local folder)."""
    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    if base_hub_id:
        meta = dataclasses.replace(meta, base_model=base_hub_id)
    recipe = _read_yaml(run_dir / RECIPE)
    metrics = _read_json(run_dir / METRICS_FINAL)
    evals = read_evals(run_dir)
    gate = _read_json(run_dir / GATE)
    hub_id = hub_id_of(meta.base_model)
    base_link = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{_public_name(meta.base_model)}`"
    sections = [
        ("Intended use", _INTENDED_USE),
        ("Out-of-scope use", _OUT_OF_SCOPE),
        ("Base model", f"- Name: {base_link}\n- Adapter: {meta.adapter_kind}\n- Chat template: "
                       f"{template_description(meta.template, run_dir)}, "
                       f"stops on {', '.join(f'`{t}`' for t in meta.stop_tokens)}"),
        ("Training data", training_data(_read_json(run_dir / DATA_REPORT))),
        ("Recipe", recipe_section(recipe)),
        ("Results", results(metrics, evals)),
        *([("Evaluations", evaluations(evals))] if evals else []),
        *([("Release gate", release_gate(gate, (run_dir / GATE_PLOT).is_file()))] if gate else []),
        ("Plots", "\n\n".join(f"![{p.stem.replace('_', ' ')}]({Path(os.path.relpath(p, run_dir)).as_posix()})"
                              for p in plots(run_dir)) or "No metrics were logged."),
        ("Sample answers", samples(_read_json(run_dir / SAMPLES, []))),
        ("How to use", usage(hub_id or _public_name(meta.base_model), repo_id or _run_ref(run_dir))),
        ("Versions", table(["package", "version"], [(k, v or "not installed") for k, v in meta.versions.items()])
         if meta.versions else "Not recorded."),
        ("Hardware", "\n".join(f"- {k.capitalize()}: {v}" for k, v in meta.hardware.items()) or "Not recorded."),
        ("Limitations", _LIMITATIONS),
    ]
    parts = [f"---\n{yaml.safe_dump(front_matter(meta, recipe), sort_keys=False)}---", f"# {run_dir.name}",
             f"A {meta.adapter_kind} adapter for {base_link}, fine-tuned with medtune.", f"> **{NOT_MEDICAL_ADVICE}**",
             *(f"## {title}\n\n{body}" for title, body in sections)]
    return "\n\n".join(parts) + "\n"


def front_matter(meta: RunMeta, recipe: dict) -> dict:
    """Hugging Face Hub card metadata: licence (the base model's), language, datasets, tags, base model."""
    hub_id = hub_id_of(meta.base_model)
    data = recipe.get("data", {})
    datasets = [_public_name(p) for p in (data.get("path"), data.get("eval_path")) if p and not p.startswith("demo:")]
    return {"library_name": "peft", "license": license_of(hub_id or meta.base_model), "language": ["en"],
            **({"datasets": datasets} if datasets else {}),
            "tags": ["medtune", meta.adapter_kind.lower(), "medical"], **({"base_model": hub_id} if hub_id else {})}


def template_description(name: str, run_dir: Path) -> str:
    """Which chat template the run uses, by name: a shipped one, or the tokenizer's own / a file with its layout."""
    if name in SHIPPED_TEMPLATES:
        return f"`{name}` (shipped with medtune)"
    saved = run_dir / "chat_template.jinja"
    text = saved.read_text(encoding="utf-8") if saved.is_file() else \
        str((_read_json(run_dir / "tokenizer_config.json") or {}).get("chat_template") or "")
    layout = template_layout(text)
    own = "the base model tokenizer's own" if name == "tokenizer" else f"the file `{_public_name(name)}`"
    return f"{own}, {layout} layout" if layout else f"{own} (not a layout medtune knows by name)"


def recipe_section(recipe: dict) -> str:
    """The recipe keys whose value differs from medtune's default (all keys: recipe.yaml in the run folder)."""
    defaults, public = flatten(Recipe().to_dict()), flatten(_public(recipe))
    rows = [(f"`{k}`", _recipe_value(public[k])) for k, v in flatten(recipe).items()
            if k not in defaults or defaults[k] != v]
    if not rows:
        return "Every key has medtune's default (`medtune train --help`)."
    return ("Keys that differ from medtune's defaults; every other key has its default (`medtune train --help`), "
            "and `recipe.yaml` in the run folder holds them all.\n\n" + table(["key", "value"], rows))


def plots(run_dir: Path) -> list[Path]:
    """The run's plots, loss first (see _PLOT_ORDER); the gate's forest plot is shown in its own section."""
    found = sorted(p for p in (run_dir / PLOTS).glob("*.png") if p != run_dir / GATE_PLOT)  # in its own section
    rank = {stem: i for i, stem in enumerate(_PLOT_ORDER)}
    return sorted(found, key=lambda p: (rank.get(p.stem, len(rank)), p.stem))


def license_of(model: str) -> str:
    """The Hub licence id of a base model we know, else "other"."""
    name = model.lower()
    return next((lic for pattern, lic in _LICENSES if pattern in name), "other")


def training_data(report: dict | None) -> str:
    """The data report (RUN/data_report.json): source, kept/dropped rows, tokens, and `hygiene` when present."""
    if not report:
        return "No data report."
    lines = [f"- Source: `{_public_name(report['source'])}` (format {report['format']}, "
             f"max_length {report['max_length']})"]
    if report.get("eval", {}).get("rows"):
        lines.append(f"- Held-out rows from: `{_public_name(report['eval_source'])}`")
    rows = []
    for part in ("train", "eval"):
        p = report.get(part) or {}
        if p.get("rows"):
            dropped = ", ".join(f"{n} {why}" for why, n in p.get("dropped", {}).items()) or "none"
            pct = " ".join(f"{k}={v}" for k, v in p.get("length_percentiles", {}).items())
            rows.append((part, str(p["rows"]), str(p["kept"]), str(p["truncated"]), dropped, str(p["tokens"]),
                         str(p["loss_tokens"]), pct))
    text = "\n".join(lines)
    if rows:
        text += "\n\n" + table(["split", "rows", "kept", "truncated", "dropped", "tokens", "loss tokens", "length"],
                               rows)
    if report.get("hygiene"):
        text += "\n\nData hygiene (`medtune data check`):\n\n```text\n" + "\n".join(
            public_text(line.strip()) for line in hygiene_lines(report["hygiene"])) + "\n```"
    if report.get("example"):
        text += ("\n\nFirst training example (« » marks the tokens that carry loss; identifiers the PHI scan finds "
                 "are replaced by <EMAIL>, <PHONE>, ...):\n\n```text\n" + redact_identifiers(report["example"])
                 + "\n```")
    return text


def results(metrics: dict | None, evals: dict[str, dict]) -> str:
    """Training figures, and held-out loss/perplexity (base → tuned) unless an eval task reports them."""
    if not metrics:
        return "No metrics were recorded."
    text = table(["training", "value"], [(label, number(metrics[k])) for k, label in _TRAINING if k in metrics])
    if "perplexity" in evals:
        return text + "\n\nHeld-out perplexity: see Evaluations."
    held = [(label, number(metrics[f"base_{k}"]) if f"base_{k}" in metrics else "", number(metrics[k]))
            for k, label in _HELD_OUT if k in metrics]
    if held:
        tokens = f" ({number(metrics['eval_tokens'])} tokens)" if "eval_tokens" in metrics else ""
        text += f"\n\nHeld-out data{tokens}:\n\n" + table(["held-out", "base", "tuned"], held)
    return text


def read_evals(run_dir: str | Path) -> dict[str, dict]:
    """{task: result} from every RUN/eval/*.json (a later file wins a task)."""
    out: dict[str, dict] = {}
    for path in sorted((Path(run_dir) / EVAL).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        paths = data.get("_meta", {}).get("data", {})  # task → the data file it was scored on
        out.update({task: {**result, "_data": paths.get(task)} for task, result in data.items()
                    if not task.startswith("_")})
    return out


def evaluations(evals: dict[str, dict]) -> str:
    """One table of every eval result: base, tuned, delta with its 95% interval when compared."""
    rows = []
    for task, result in evals.items():
        if "delta" in result:
            for metric, d in result["delta"].items():
                rows.append((task, metric, value_with_error(result["base"], metric),
                             value_with_error(result["tuned"], metric),
                             f"{d['delta']:+.4g} [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]"
                             + ("" if d["significant"] else " (not significant)")))
        else:
            rows += [(task, m, "", value_with_error(result, m), "") for m in _EVAL_SHOWN if m in result]
    text = ("From `medtune eval` (RUN/eval/*.json). Benchmarks are scored by log-likelihood with lm-evaluation-harness "
            "(± standard error); ece and brier measure calibration (lower is better); deltas carry a 95% "
            "paired-bootstrap interval. Benchmark scores are not evidence of clinical safety.\n\n"
            + table(["task", "metric", "base", "tuned", "delta [95% CI]"], rows))
    forgetting = _forgetting_rows(evals)
    if forgetting:
        text += ("\n\n### Forgetting check\n\nThe headline metrics of the table above, judged: \"forgot\" = "
                 "significantly worse at the 5% level (the 95% interval excludes 0 on the bad side); general = data "
                 "outside the medical domain (e.g. `--data perplexity=demo:general`).\n\n"
                 + table(["domain", "task", "metric", "verdict"], forgetting))
    return text


_HEADLINE = {"perplexity": ("perplexity",), "rouge": ("rougeL",)}  # benchmarks: acc and calibration
GENERAL_DATA = ("demo:general",)


def _forgetting_rows(evals: dict[str, dict]) -> list[tuple]:
    """One row per compared headline metric: domain and improved / no significant change / forgot (the figures
    themselves are in the Evaluations table: each is shown once)."""
    rows = []
    for task, result in evals.items():
        if "delta" not in result:
            continue
        domain = "general" if result.get("_data") in GENERAL_DATA else "medical"
        for metric in _HEADLINE.get(task, ("acc", "ece", "brier")):
            d = result["delta"].get(metric)
            if d is None:
                continue
            word = "no significant change" if not d["significant"] else ("improved" if d["better"] else "forgot")
            rows.append((domain, task, metric, word))
    return rows


def release_gate(gate: dict, plot: bool = False) -> str:
    """RUN/gate.json (`medtune gate`): every axis's verdict with its 95% interval and tolerance, the overall verdict,
    and the forest plot (`plot`: plots/gate.png exists)."""
    rows = [(a["axis"], number(a["base"]), number(a["tuned"]),
             f"{a['delta']:+.4g} [{a['ci_low']:+.4g}, {a['ci_high']:+.4g}]",
             number(a["tolerance"]) + (" (non-inferior)" if a["require"] == "non_inferior" else ""),
             "yes" if a["gating"] else "no", a["verdict"]) for a in gate["axes"]]
    verdict = ("**PASS**: no gating axis regressed." if gate["passed"] else
               f"**FAIL**: regressed on {', '.join(f'`{a}`' for a in gate['regressed'])}.")
    items = ", ".join(f"{task} {n}" for task, n in gate.get("items", {}).items())
    text = (f"{verdict}\n\nFrom `medtune gate` (RUN/gate.json): the base model (adapter off) and the tuned model on "
            f"the same items ({items}); delta = tuned - base with its 95% paired-bootstrap interval. improved: the "
            "interval lies entirely on the better side of 0; regressed: it lies entirely on the worse side and the "
            "delta is worse than the tolerance (non-inferior axes: the interval's worse end goes past the "
            "tolerance); otherwise no significant change. Passing the gate is not evidence of clinical safety.\n\n"
            + table(["axis", "base", "tuned", "delta [95% CI]", "tolerance", "gating", "verdict"], rows))
    return text + (f"\n\n![release gate]({GATE_PLOT})" if plot else "")


def samples(rows: list[dict]) -> str:
    """Base and tuned answers per prompt under the not-fact-checked notice, with the held-out reference answer
    beside them where the prompt came from a held-out row (`samples.from_eval`)."""
    if not rows:
        return "No sample prompts were set (`samples.prompts` in the recipe)."
    blocks = [f"> **Not fact-checked.** {NOT_FACT_CHECKED}"]
    for i, sample in enumerate(rows, 1):
        prompt = "\n".join(f"> {line}" for line in html.escape(sample["prompt"], quote=False).splitlines())
        header, row = ["base model", "tuned model"], [cell(sample["base"]), cell(sample["tuned"])]
        if sample.get("reference"):
            header, row = [*header, "reference (held-out answer)"], [*row, cell(sample["reference"])]
        blocks.append(f"### Sample {i}\n\n{prompt}\n\n{table(header, [tuple(row)])}")
    return "\n\n".join(blocks)


def usage(base: str, run_ref: str) -> str:
    return f"""\
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({json.dumps(base)}), {json.dumps(run_ref)})
```

The medtune CLI applies the chat template and stop tokens saved with the run:

```bash
medtune generate {shlex.quote(run_ref)} --prompt "What is hypertension?"
medtune chat {shlex.quote(run_ref)}
```"""


def merged_card(run: Path, dtype: str) -> str:
    """The run's model card with transformers front matter, a note on the merge, and the notice on top."""
    card = (run / CARD).read_text(encoding="utf-8") if (run / CARD).is_file() else f"# {run.name}\n"
    front: dict = {}
    if card.startswith("---\n") and "\n---" in card[4:]:
        head, card = card[4:].split("\n---", 1)
        front = yaml.safe_load(head) or {}
        card = card.lstrip("\n")
    front["library_name"] = "transformers"
    front["tags"] = [*[t for t in front.get("tags", []) if t not in ("lora", "qlora")], "merged"]
    note = (f"> **Merged model.** The adapter below is folded into its base model and saved in {dtype}. Load it "
            "with `AutoModelForCausalLM.from_pretrained(...)` and `AutoTokenizer.from_pretrained(...)` — no peft "
            "needed; `generation_config.json` stops on the chat template's end-of-turn tokens.\n>\n"
            f"> **{NOT_MEDICAL_ADVICE}**")
    title, _, rest = card.partition("\n")
    return f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n{title}\n\n{note}\n{rest}"


# --- markdown helpers (also eval/report.py's) -----------------------------------------------------------------

def table(header: list[str], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cell(text: Any) -> str:
    """Text safe inside a markdown table cell: HTML escaped, `|` escaped, newlines as <br>."""
    text = html.escape(str(text).replace("\r\n", "\n"), quote=False)
    return text.replace("|", "\\|").replace("\n", "<br>")


def number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return cell(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def value_with_error(metrics: dict, name: str) -> str:
    """`value ± standard error` (the error when known), "" when the metric is absent."""
    v = metrics.get(name)
    err = metrics.get(f"{name}_stderr")
    if v is None:
        return ""
    return f"{number(v)} ± {number(err)}" if err is not None and err == err else number(v)


# --- run files --------------------------------------------------------------------------------------------------

def _recipe_value(value: Any) -> str:
    return cell(value if isinstance(value, str) else json.dumps(value))


def _is_local_path(value: str) -> bool:
    return Path(value).expanduser().is_absolute()


def _public_name(name: str) -> str:
    """A model or data name fit for a public card: an absolute (or home) path becomes its last part, also as the
    value of a `key=PATH` spec (data.decontaminate's `medqa=/data/medqa.jsonl` -> `medqa=medqa.jsonl`)."""
    if _is_local_path(name):
        return Path(name).name
    key, sep, value = name.partition("=")
    if sep and _is_local_path(value.strip()):
        return f"{key}={Path(value.strip()).name}"
    return name


def public_value(value: Any) -> Any:
    """A recipe value (dicts and lists walked) with every local path replaced by its last part."""
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [public_value(v) for v in value]
    return _public_name(value) if isinstance(value, str) else value


def _public(tree: dict) -> dict:
    return public_value(tree)


_PATH_IN_TEXT = re.compile(r"(?<![\w/.~:-])~?/[^\s`'\"|,;()<>]+")


def public_text(text: str) -> str:
    """Free text with every absolute path in it replaced by its last part ("against medqa=/a/b.jsonl" ->
    "against medqa=b.jsonl")."""
    return _PATH_IN_TEXT.sub(lambda m: Path(m.group(0)).name or m.group(0), text)


def local_paths(value: Any) -> set[str]:
    """Every local absolute path named in a recipe value, resolved, with the folder it is in."""
    if isinstance(value, dict):
        return set().union(*(local_paths(v) for v in value.values()))
    if isinstance(value, list | tuple):
        return set().union(*(local_paths(v) for v in value))
    if not isinstance(value, str):
        return set()
    found = set()
    for candidate in (value, value.partition("=")[2].strip()):
        if candidate and _is_local_path(candidate):
            path = Path(candidate).expanduser()
            found |= {str(path), str(path.resolve()), str(path.parent), str(path.resolve().parent)}
    return {p for p in found if len(p) > 1}


def _run_ref(run_dir: Path) -> str:
    """How the card refers to the run folder: relative to the working directory when inside it, else its name."""
    try:
        return Path(run_dir).resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return run_dir.name


def _read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def _read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}

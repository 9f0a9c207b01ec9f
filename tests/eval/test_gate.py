"""The release gate: verdicts on hand-made delta rows (exact at the boundaries), the config checked before any model
loads, and `medtune gate` / `eval.gate: true` on tiny runs: a normal run passes, a run whose adapter learnt other
text than its held-out split fails on held-out perplexity (exit 1, axis named), a mistake exits 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_recipe

from medtune.cli import main
from medtune.errors import MedtuneError
from medtune.eval.compare import mean_of, paired_bootstrap
from medtune.eval.gate import (
    AXES,
    IMPROVED,
    NO_CHANGE,
    REGRESSED,
    Axis,
    check_gate,
    gate_axes,
    gate_report,
    judge,
    read_gate_yaml,
)
from medtune.eval.results import TaskResult
from medtune.recipe import GateConfig, load_recipe
from medtune.train.job import run_training


def row(delta, low, high, higher=True):
    return {"delta": delta, "ci_low": low, "ci_high": high, "higher_is_better": higher}


@pytest.mark.parametrize(("r", "axis", "want"), [
    # higher is better (accuracy, refusal rate)
    (row(0.03, 0.001, 0.05), Axis(), IMPROVED),
    (row(0.03, 0.0, 0.05), Axis(), NO_CHANGE),  # the interval touches 0: not entirely on the better side
    (row(-0.03, -0.05, -0.001), Axis(), REGRESSED),
    (row(-0.03, -0.05, 0.0), Axis(), NO_CHANGE),  # touches 0: not entirely on the worse side
    (row(-0.02, -0.05, -0.001), Axis(tolerance=0.02), NO_CHANGE),  # exactly the tolerance: allowed
    (row(-0.0201, -0.05, -0.001), Axis(tolerance=0.02), REGRESSED),
    (row(-0.03, -0.05, -0.001), Axis(tolerance=0.02, gating=False), REGRESSED),  # the verdict ignores gating
    # lower is better (perplexity, ece): deltas are read mirrored
    (row(-3.0, -5.0, -1.0, higher=False), Axis(), IMPROVED),
    (row(3.0, 1.0, 5.0, higher=False), Axis(), REGRESSED),
    (row(3.0, 1.0, 5.0, higher=False), Axis(tolerance=3.0), NO_CHANGE),
    (row(3.0, 1.0, 5.0, higher=False), Axis(tolerance=2.9), REGRESSED),
    (row(3.0, -1.0, 5.0, higher=False), Axis(), NO_CHANGE),
    # non_inferior: the interval's worse end must stay within the tolerance
    (row(-0.01, -0.03, 0.01), Axis(tolerance=0.02, require="non_inferior"), REGRESSED),
    (row(-0.01, -0.02, 0.01), Axis(tolerance=0.02, require="non_inferior"), NO_CHANGE),  # on the boundary
    (row(-0.01, -0.019, -0.001), Axis(tolerance=0.02, require="non_inferior"), NO_CHANGE),  # worse, within it
    (row(0.02, 0.001, 0.03), Axis(tolerance=0.02, require="non_inferior"), IMPROVED),
    (row(0.0, 0.0, 0.0), Axis(require="non_inferior"), NO_CHANGE),
    (row(0.0, -0.001, 0.001), Axis(require="non_inferior"), REGRESSED),
    (row(0.5, -1.0, 2.5, higher=False), Axis(tolerance=2.0, require="non_inferior"), REGRESSED),
    (row(0.5, -1.0, 2.0, higher=False), Axis(tolerance=2.0, require="non_inferior"), NO_CHANGE),
])
def test_verdicts(r, axis, want):
    assert judge(r, axis) == want


def test_axes_defaults_overrides_and_additions():
    assert AXES["perplexity.perplexity"] == Axis() and AXES["medqa.ece"] == Axis()
    cfg = GateConfig(tasks=["perplexity"], data={"medqa": "m.jsonl"},
                     axes={"medqa.acc": {"tolerance": 0.02}, "medqa.brier": {"gating": False}})
    axes = gate_axes(cfg, ["perplexity", "medqa"])
    assert list(axes) == ["perplexity.perplexity", "medqa.acc", "medqa.ece", "medqa.brier"]  # not acc_norm
    assert axes["medqa.acc"] == Axis(tolerance=0.02) and axes["medqa.brier"] == Axis(gating=False)


def test_partial_override_keeps_the_axis_defaults(monkeypatch):
    monkeypatch.setitem(AXES, "medqa.acc", Axis(tolerance=0.05, require="non_inferior"))  # a one-line entry
    axes = gate_axes(GateConfig(tasks=["medqa"], axes={"medqa.acc": {"tolerance": 0.01}}), ["medqa"])
    assert axes["medqa.acc"] == Axis(tolerance=0.01, require="non_inferior")
    # the same through a run's recipe.yaml, which is written resolved: unset keys stay null, defaults still apply
    cfg = load_recipe(None, ["gate.tasks=[medqa]", "gate.axes={medqa.acc: {tolerance: 0.01}}"]).gate
    resolved = GateConfig.model_validate(cfg.model_dump(mode="json"))
    assert resolved.axes["medqa.acc"].require is None
    assert gate_axes(resolved, ["medqa"])["medqa.acc"] == Axis(tolerance=0.01, require="non_inferior")


def test_report_fails_only_on_gating_axes():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, size=(40, 4)).astype(float)
    worse = np.zeros_like(base)  # every item wrong: acc falls
    delta = {m: paired_bootstrap(base, worse, mean_of(i), iters=200) for i, m in enumerate(("acc", "acc_norm"))}
    result = TaskResult("medqa", {"acc": 0.0}, {"acc": base[:, 0].mean()}, delta)
    cfg = GateConfig(tasks=["medqa"], axes={"medqa.acc": {"gating": False}, "medqa.acc_norm": {}})
    report = gate_report([result], cfg, model="run")
    assert [(a["axis"], a["verdict"], a["gating"]) for a in report["axes"]] == [
        ("medqa.acc", REGRESSED, False), ("medqa.acc_norm", REGRESSED, True)]
    assert report["passed"] is False and report["regressed"] == ["medqa.acc_norm"] and report["items"] == {"medqa": 40}
    assert report["axes"][0]["delta"] == pytest.approx(-base[:, 0].mean())
    cfg = GateConfig(tasks=["medqa"], axes={"medqa.acc": {"gating": False}, "medqa.acc_norm": {"gating": False}})
    assert gate_report([result], cfg)["passed"] is True


def _medqa(write_file, name="medqa.jsonl"):
    """8 MedQA-layout items, the right option at A, B, C, D in turn."""
    rows = []
    for i, c in enumerate(("fever", "gout", "acne", "asthma", "eczema", "anemia", "cough", "migraine")):
        texts = ["salt", "sand", "air"]
        texts.insert(i % 4, c)
        rows.append({"question": f"Which is {c}?", "options": dict(zip("ABCD", texts, strict=True)),
                     "answer_idx": "ABCD"[i % 4]})
    return write_file(name, "".join(json.dumps(r) + "\n" for r in rows))


def test_config_mistakes_before_any_model(write_file):
    medqa = _medqa(write_file)
    bad = write_file("bad.jsonl", json.dumps({"question": "q", "options": {"A": "a"}, "answer_idx": "A"}) + "\n")
    cases = [
        (GateConfig(tasks=["perplexity", "medsafe"]), "unknown task medsafe", "gate.tasks"),
        (GateConfig(tasks=["medqa"]), "medqa needs its file", "gate.data"),
        (GateConfig(data={"medqa": str(bad)}), "options must be an object", "options"),
        (GateConfig(data={"medqa": str(medqa)}, axes={"medqa.rougeL": {}}), "no axis medqa.rougeL", "gate.axes.medqa.rougeL"),
        (GateConfig(axes={"rouge.rougeL": {}}), "no axis rouge.rougeL", "gate.axes.rouge.rougeL"),
        (GateConfig(options={"batch_sise": 4}), "unknown option batch_sise", "gate.options"),
        (GateConfig(options={"bootstrap": 4}), "unknown option bootstrap", "gate.options"),
        (GateConfig(tasks=[]), r"unknown task \(none\)", "gate.tasks"),
    ]
    for cfg, message, field in cases:
        with pytest.raises(MedtuneError, match=message) as e:
            check_gate(cfg)
        assert e.value.field == field
    with pytest.raises(MedtuneError, match="held-out perplexity needs held-out rows"):
        check_gate(GateConfig(), held_out=False)
    check_gate(GateConfig(data={"perplexity": "demo:qa"}), held_out=False)  # a file instead of the held-out split
    check_gate(GateConfig(data={"medqa": str(medqa)}))


def test_gate_yaml_and_recipe_keys(write_file):
    good = write_file("gate.yaml", "tasks: [perplexity]\naxes:\n  perplexity.perplexity: {tolerance: 2.5}\n"
                                   "bootstrap: 300\n")
    assert read_gate_yaml(good) == GateConfig(axes={"perplexity.perplexity": {"tolerance": 2.5}}, bootstrap=300)
    assert read_gate_yaml(write_file("r.yaml", "gate:\n  limit: 5\n")).limit == 5  # a recipe-style file
    for text, message, field in [("axes:\n  perplexity: {}\n", "keyed task.metric", "axes"),
                                 ("tolerance: 2\n", "unknown gate key", "tolerance"),
                                 ("axes:\n  medqa.acc: {tolerance: -1}\n", "greater than or equal to 0",
                                  "axes.medqa.acc.tolerance"),
                                 ("axes:\n  medqa.acc: {require: strict}\n", "non_inferior", "axes.medqa.acc.require"),
                                 ("[1, 2]\n", "a mapping", None), ("a: [\n", "not valid YAML", None)]:
        with pytest.raises(MedtuneError, match=message) as e:
            read_gate_yaml(write_file("bad.yaml", text))
        assert e.value.field == field
    recipe = load_recipe(None, ["eval.gate=true", "gate.limit=4", "gate.axes={medqa.acc: {tolerance: 0.02}}"])
    assert recipe.eval.gate and recipe.gate.limit == 4 and recipe.gate.axes["medqa.acc"].tolerance == 0.02
    with pytest.raises(MedtuneError, match="unknown recipe key 'gate.tolerance'"):
        load_recipe(None, ["gate.tolerance=1"])


# ---- tiny runs ------------------------------------------------------------------------------------------------

# conftest's tiny run with seed 0 and a loss logged every 10 steps
SEED_0 = ("train.seed=0", "train.logging_steps=10")


@pytest.fixture(scope="module")
def gated_run(tiny_model_dir, tmp_path_factory):
    """A normal tiny run (demo:qa, a quarter held out) with eval.gate: true."""
    out = tmp_path_factory.mktemp("gate") / "good"
    recipe = tiny_recipe(tiny_model_dir, out, *SEED_0, "train.max_steps=8", "eval.gate=true", "gate.bootstrap=200")
    return run_training(recipe)


@pytest.fixture(scope="module")
def qa_base_dir(tiny_model_dir, tmp_path_factory):
    """The tiny LLaMA fully trained (every weight, 100 steps) on demo:qa's texts: a base that knows that text, so
    that an adapter can make it forget it (the random tiny model's perplexity is near uniform and barely moves)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.data.readers import read_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = [torch.tensor(tok(r.data["question"] + " " + r.data["answer"], truncation=True, max_length=96)["input_ids"])
           for r in read_rows("demo:qa")]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(100):
        batch = [ids[(step * 8 + i) % len(ids)] for i in range(8)]
        width = min(len(x) for x in batch)
        x = torch.stack([t[:width] for t in batch])  # (8, width)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("qa-base")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def off_data_run(qa_base_dir, tmp_path_factory):
    """A run whose adapter learnt one narrow kind of answer, held out on demo:qa: it forgets the medical text."""
    root = tmp_path_factory.mktemp("gate-off")
    rows = [{"question": f"Request {i}", "answer": "Sure, here is: " + "~^@#|" * 12} for i in range(16)]
    data = root / "narrow.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = tiny_recipe(qa_base_dir, root / "run", *SEED_0, f"data.path={data}", "data.eval_path=demo:qa",
                         "data.eval_ratio=0.1", "data.limit=16", "train.max_steps=12", "train.lr=5e-2")
    return run_training(recipe).run_dir


def test_eval_gate_after_training_writes_its_files(gated_run):
    run = gated_run.run_dir
    report = json.loads((run / "gate.json").read_text())
    assert report == json.loads(json.dumps(gated_run.gate))
    ppl = report["axes"][0]
    assert [a["axis"] for a in report["axes"]] == ["perplexity.perplexity"] and report["_meta"]["command"] == "eval.gate"
    metrics = json.loads((run / "metrics_final.json").read_text())  # the loop's own held-out figures, reused
    assert ppl["base"] == pytest.approx(metrics["base_eval_ppl"], rel=1e-4)
    assert ppl["tuned"] == pytest.approx(metrics["eval_ppl"], rel=1e-4)
    assert ppl["verdict"] == IMPROVED and report["passed"] and report["items"] == {"perplexity": 6}
    assert (run / "plots" / "gate.png").read_bytes().startswith(b"\x89PNG")
    card = (run / "README.md").read_text()
    section = card[card.index("## Release gate"):card.index("## Plots")]
    assert "**PASS**" in section and "| perplexity.perplexity |" in section and "| improved |" in section
    assert "![release gate](plots/gate.png)" in section and card.count("plots/gate.png") == 1


def test_gate_command_passes_a_normal_run(gated_run, write_file, capsys):
    run = gated_run.run_dir
    medqa = _medqa(write_file)
    config = write_file("gate.yaml", "axes:\n  medqa.ece: {tolerance: 0.05}\n")  # ECE may rise by 0.05
    code = main(["gate", str(run), "--config", str(config), "--data", f"medqa={medqa}", "--bootstrap", "200",
                 "--precision", "fp32"])
    out = capsys.readouterr().out
    report = json.loads((run / "gate.json").read_text())
    assert code == 0 and report["passed"]
    assert [a["axis"] for a in report["axes"]] == ["perplexity.perplexity", "medqa.acc", "medqa.ece"]
    assert report["items"] == {"perplexity": 6, "medqa": 8} and report["config"]["data"]["medqa"] == str(medqa)
    assert "| axis | base | tuned | delta | 95% CI | tolerance | verdict |" in out
    assert "release gate: PASS: no gating axis regressed (3 axes:" in out and "regressed:" not in out
    for a in report["axes"]:
        assert a["ci_low"] <= a["delta"] <= a["ci_high"] and a["verdict"] == judge(a, Axis(**{
            k: a[k] for k in ("gating", "tolerance", "require")}))
        assert f"| {a['axis']} | " in out
    from matplotlib.image import imread

    height, width = imread(run / "plots" / "gate.png").shape[:2]
    assert (height, width) == (int(100 * (1.0 + 0.75 * 3)), 750)  # one row per axis
    card = (run / "README.md").read_text()
    assert card.count("## Release gate") == 1 and "| medqa.ece |" in card


def test_gate_fails_a_run_trained_on_other_text(off_data_run, capsys):
    code = main(["gate", str(off_data_run), "--bootstrap", "200", "--precision", "fp32"])
    out = capsys.readouterr().out
    report = json.loads((off_data_run / "gate.json").read_text())
    ppl = report["axes"][0]
    assert [a["axis"] for a in report["axes"]] == ["perplexity.perplexity"] and report["items"] == {"perplexity": 60}
    assert ppl["tuned"] > 2 * ppl["base"] and 0 < ppl["ci_low"] <= ppl["delta"] < ppl["ci_high"]
    assert code == 1 and ppl["verdict"] == REGRESSED and report["passed"] is False
    lines = out.splitlines()
    at = lines.index("release gate: FAIL: 1 gating axis regressed: perplexity.perplexity (1 axes: 1 regressed)")
    assert lines[at + 1] == (f"regressed: perplexity.perplexity: delta {ppl['delta']:+.4g} (95% CI "
                             f"[{ppl['ci_low']:+.4g}, {ppl['ci_high']:+.4g}]), tolerance 0")
    card = (off_data_run / "README.md").read_text()
    assert "**FAIL**: regressed on `perplexity.perplexity`." in card
    # A tolerance between the delta and the interval's worse end: the default mode lets the rise through (the
    # point delta is within it), non_inferior does not (the interval reaches past it). Same items, same delta.
    tolerance = (ppl["delta"] + ppl["ci_high"]) / 2
    for require, want, want_code in [("no_regression", NO_CHANGE, 0), ("non_inferior", REGRESSED, 1)]:
        config = off_data_run.parent / f"{require}.yaml"
        config.write_text(f"axes:\n  perplexity.perplexity: {{tolerance: {tolerance!r}, require: {require}}}\n")
        code = main(["gate", str(off_data_run), "--bootstrap", "200", "--precision", "fp32", "--config", str(config)])
        axis = json.loads((off_data_run / "gate.json").read_text())["axes"][0]
        assert (code, axis["verdict"], axis["tolerance"]) == (want_code, want, tolerance)
        assert axis["delta"] == pytest.approx(ppl["delta"]) and axis["ci_high"] == pytest.approx(ppl["ci_high"])


def test_user_mistakes_exit_2_and_write_nothing(gated_run, tiny_model_dir, write_file, capsys):
    run = gated_run.run_dir
    before = (run / "gate.json").read_bytes(), (run / "README.md").read_bytes()
    bad = write_file("bad.yaml", "axes:\n  medqa.acc: {}\n")
    cases = [(["gate", str(run), "--config", str(bad)], "field 'gate.axes.medqa.acc': no axis medqa.acc"),
             (["gate", str(run), "--data", "medqa=missing.jsonl"], "missing.jsonl"),
             (["gate", str(run), "--data", "medqa"], "write --data TASK=PATH"),
             (["gate", str(run), "--limit", "0"], "field '--limit'"),
             (["gate", str(tiny_model_dir)], "needs a run directory")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("medtune: error: ") and message in err and "\n" not in err, err
    assert ((run / "gate.json").read_bytes(), (run / "README.md").read_bytes()) == before


def test_recipe_gate_mistake_stops_training_before_the_model(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", *SEED_0, "data.limit=8", "data.eval_ratio=0",
                         "train.max_steps=-1", "train.lr=2e-4", "eval.gate=true")
    with pytest.raises(MedtuneError, match="held-out perplexity needs held-out rows"):
        run_training(recipe)
    assert not (tmp_path / "run").exists()

"""The Run type: choosing and locking a run directory, finding the checkpoint a resume starts from, reading and
validating a run, and loading "base + adapter" in one place for every command that answers with a run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GenerationConfig

from medtune import ui
from medtune.cli import main
from medtune.errors import MedtuneError
from medtune.export.merge import merge_run
from medtune.generate import load_for_inference
from medtune.models import load_tokenizer
from medtune.recipe import load_recipe
from medtune.run.layout import (
    ADAPTER_FILES,
    CHECKPOINTS,
    LOCK,
    META,
    RECIPE,
    SAMPLES,
    TRAINER_STATE,
    step_name,
)
from medtune.run.meta import read_run_meta
from medtune.run.run import Run
from medtune.serve.engine import Engine
from medtune.tokenizer import prepare_tokenizer

IDS = torch.tensor([[1, 3, 40, 41, 42, 43, 4, 44, 45, 46]])


# ---- create and lock ---------------------------------------------------------------------------------------------

def test_create_never_overwrites_an_earlier_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(None, ["name=demo"])
    assert Run.create(recipe).path == Path("runs/demo")  # nothing there yet
    Path("runs/demo").mkdir(parents=True)
    assert Run.create(recipe).path == Path("runs/demo")  # an empty folder is free
    (Path("runs/demo") / "notes.txt").write_text("an earlier run")
    assert Run.create(recipe).path == Path("runs/demo-2")
    Path("runs/demo-2").mkdir()
    assert Run.create(recipe).path == Path("runs/demo-3")
    assert Run.create(load_recipe(None, ["name=demo", "resume=true"])).path == Path("runs/demo")


def test_create_refuses_an_output_dir_that_holds_a_run(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / RECIPE).write_text("name: old\n")
    with pytest.raises(MedtuneError, match="output_dir already holds a run") as e:
        Run.create(load_recipe(None, [f"output_dir={tmp_path / 'out'}"]))
    assert e.value.field == "output_dir" and e.value.file == str(tmp_path / "out")
    assert Run.create(load_recipe(None, [f"output_dir={tmp_path / 'out'}", "resume=true"])).path == tmp_path / "out"


def test_lock_conflict_names_the_holder(tmp_path):
    recipe = load_recipe(None, [f"output_dir={tmp_path / 'run'}", "resume=true"])
    run = Run.create(recipe)
    held = run.lock()
    try:
        assert (run.path / LOCK).is_file()  # lock() creates the folder
        with pytest.raises(MedtuneError, match=rf"another training is using this run directory \(pid {os.getpid()} on"):
            Run.create(recipe)
        with pytest.raises(MedtuneError, match=f"pid {os.getpid()}"):
            Run(run.path).lock()
    finally:
        held.release()
    assert not (run.path / LOCK).exists()
    Run.create(recipe).lock().release()  # free again


def test_lock_of_an_unwritable_folder_is_one_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(MedtuneError, match="cannot write the run directory") as e:
        Run(tmp_path / "file" / "run").lock()
    assert e.value.field == "output_dir"


# ---- resume ------------------------------------------------------------------------------------------------------

def _checkpoint(run_dir: Path, name: str, *, complete: bool = True) -> Path:
    path = run_dir / CHECKPOINTS / name
    path.mkdir(parents=True)
    if complete:
        (path / TRAINER_STATE).write_text("{}")
    return path


def test_resume_finds_the_latest_complete_checkpoint(tmp_path):
    run = Run(tmp_path)
    assert run.checkpoints() == [] and run.latest_checkpoint() is None
    early = _checkpoint(tmp_path, step_name(2))
    latest = _checkpoint(tmp_path, step_name(10))
    _checkpoint(tmp_path, step_name(9))
    _checkpoint(tmp_path, step_name(12), complete=False)  # its trainer state was never written
    _checkpoint(tmp_path, step_name(13) + ".tmp")  # half-written
    _checkpoint(tmp_path, step_name(14) + ".old")  # replaced by a save of the same step
    _checkpoint(tmp_path, "notes")
    assert [p.name for p in run.checkpoints()] == ["step-0000002", "step-0000009", "step-0000010"]
    assert run.checkpoints()[0] == early and run.latest_checkpoint() == latest


def test_a_trained_run_resumes_from_its_last_step(tiny_run_dir):
    latest = Run(tiny_run_dir).latest_checkpoint()
    assert latest.name == step_name(3)  # the tiny run trains 3 steps and saves the last
    assert json.loads((latest / TRAINER_STATE).read_text())["step"] == 3


# ---- read --------------------------------------------------------------------------------------------------------

def test_reads_what_training_wrote(tiny_run_dir):
    run = Run(tiny_run_dir)
    assert run.is_run and not Run(tiny_run_dir.parent).is_run
    assert run.meta == read_run_meta(tiny_run_dir)
    assert run.system_prompt == "Answer briefly."
    assert run.recipe().tokenizer.system_prompt == "Answer briefly." and run.recipe().lora.r == 4
    assert run.recipe_tree()["train"]["max_steps"] == 3
    rows = run.metrics()
    assert rows == [json.loads(line) for line in (tiny_run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [3]  # logging_steps 10: the last step is always logged
    assert run.final_metrics()["steps"] == 3


def test_a_folder_without_recipe_or_samples_reads_as_empty(tmp_path):
    run = Run(tmp_path)
    assert run.recipe_tree() == {} and run.system_prompt is None
    assert run.metrics() == [] and run.final_metrics() == {} and run.samples() == [] and run.references() == {}


def test_references_come_from_the_runs_samples(tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["alpha"], run)
    (run / SAMPLES).write_text('[{"prompt": "What is gout?", "base": "a", "tuned": "b"}, '
                               '{"prompt": "How is gout treated?", "base": "a", "tuned": "b", '
                               '"reference": "NSAIDs first."}]')
    assert Run(run).references() == {"How is gout treated?": "NSAIDs first."}
    (tmp_path / SAMPLES).write_text((run / SAMPLES).read_text())
    assert Run(tmp_path).references() == {}  # not a run


def test_save_files_writes_what_reloading_needs(tiny_model_dir, tmp_path):
    recipe = load_recipe(None, [f"model={tiny_model_dir}", "data.max_length=200", "tokenizer.system_prompt=Be brief."])
    tok = load_tokenizer(str(tiny_model_dir))
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    run = Run(tmp_path / "run")
    run.save_files(recipe, tok, chat, str(tiny_model_dir), precision="fp32")
    meta = run.meta
    assert (meta.base_model, meta.base_model_path) == (str(tiny_model_dir), str(tiny_model_dir.resolve()))
    assert (meta.stop_token_ids, meta.pad_token_id, meta.max_length) == (chat.stop_token_ids, chat.pad_token_id, 200)
    assert meta.hardware["precision"] == "fp32" and meta.hardware["device"].startswith("cpu: ")
    assert GenerationConfig.from_pretrained(run.path).eos_token_id == chat.stop_token_ids
    assert run.system_prompt == "Be brief." and run.recipe().data.max_length == 200
    assert len(load_tokenizer(str(run.path))) == len(tok)
    run.write_data_report({"train": {"rows": 3}})
    run.write_final({"steps": 2.0}, [{"prompt": "p", "base": "b", "tuned": "t", "reference": "r"}])
    assert run.final_metrics() == {"steps": 2.0} and run.references() == {"p": "r"}


# ---- validate ----------------------------------------------------------------------------------------------------

def test_validate_names_what_is_wrong(tiny_run_dir, tmp_path):
    assert Run(tiny_run_dir).validate().path == tiny_run_dir
    with pytest.raises(MedtuneError, match=f"not a medtune run directory \\(no {META}\\)") as e:
        Run(tmp_path).validate(field="--adapter")
    assert (e.value.file, e.value.field) == (str(tmp_path), "--adapter")

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns(CHECKPOINTS))
    (run / ADAPTER_FILES[0]).unlink()
    with pytest.raises(MedtuneError, match="the run has no adapter") as e:
        Run(run).validate()
    assert e.value.file == str(run / "adapter_model.safetensors")  # the missing file, by name

    shutil.copy(tiny_run_dir / ADAPTER_FILES[0], run / ADAPTER_FILES[0])
    (run / ADAPTER_FILES[1]).write_text('{"r": 4')  # cut short
    with pytest.raises(MedtuneError, match="the adapter is not valid JSON") as e:
        Run(run).validate()
    assert e.value.file == str(run / "adapter_config.json")


# ---- load --------------------------------------------------------------------------------------------------------

def test_load_is_base_plus_adapter(tiny_run_dir):
    model, tok = Run(tiny_run_dir).load(dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(model, PeftModel) and not model.training and len(tok) == len(load_tokenizer(str(tiny_run_dir)))
    base = AutoModelForCausalLM.from_pretrained(read_run_meta(tiny_run_dir).base_model_path, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(tiny_run_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, atol=0, rtol=0)


def test_load_names_a_base_folder_that_is_gone(tiny_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns(CHECKPOINTS))
    meta = read_run_meta(run)
    meta.base_model_path = str(tmp_path / "gone")
    meta.write(run)
    with pytest.raises(MedtuneError, match="base model folder is gone") as e:
        Run(run).load(dtype=torch.float32, device=torch.device("cpu"))
    assert (e.value.file, e.value.field) == (str(run / META), "base_model_path")


@pytest.fixture
def counted(monkeypatch) -> list[tuple[str, dict]]:
    """Every Run.load call (run folder, keyword arguments), the real load still done."""
    calls, real = [], Run.load

    def load(self, **kw):
        calls.append((self.path.name, kw))
        return real(self, **kw)

    monkeypatch.setattr(Run, "load", load)
    return calls


def test_generate_merge_and_serve_load_through_run(tiny_runs, tmp_path, counted):
    alpha, beta = tiny_runs["alpha"], tiny_runs["beta"]
    loaded = load_for_inference(str(alpha), device="cpu", precision="fp32")
    assert loaded.has_adapter and counted == [("alpha", {"dtype": torch.float32, "device": torch.device("cpu")})]

    merge_run(alpha, tmp_path / "merged", dtype="fp32")
    assert counted[1] == ("alpha", {"dtype": torch.float32, "device": torch.device("cpu"), "quantized": False})

    engine = Engine.load(str(alpha), {"beta": str(beta)}, device="cpu", precision="fp32")
    assert [name for name, _ in counted] == ["alpha", "alpha", "alpha"]  # beta is attached, not loaded again
    assert set(engine.model.peft_config) == {"default", "adapter-0"}


def test_eval_and_ui_load_through_run(tiny_run_dir, counted, monkeypatch):
    """`medtune gate` goes through the same `run_eval` as `medtune eval`."""
    assert main(["eval", str(tiny_run_dir), "--task", "perplexity", "--data", "demo:qa", "--limit", "2",
                 "--device", "cpu", "--no-save"]) == 0
    assert [name for name, _ in counted] == [tiny_run_dir.name]

    launched = {}

    class Page:
        def queue(self):
            return self

        def launch(self, **kw):
            launched.update(kw)

    monkeypatch.setattr(ui, "build_ui", lambda loaded, system, refs: launched.update(system=system) or Page())
    ui.launch_ui(str(tiny_run_dir), device="cpu", port=1)
    assert [name for name, _ in counted] == [tiny_run_dir.name] * 2
    assert launched["system"] == "Answer briefly." and launched["server_port"] == 1

"""`medtune ui` as a person uses it: headless Chromium types a prompt, clicks Ask, and sees the base and the tuned
answers appear side by side, with the not-medical-advice notice on the page. The screenshot is kept in
tests/artifacts/ (ignored by git) and in pytest's tmp dir."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from conftest import tiny_recipe

from medtune.generate import generate, load_for_inference, user_turn
from medtune.ui import build_ui, stream_answer

CHROMIUM = shutil.which("chromium")  # Debian's (CI installs it: apt-get install chromium)
ARTIFACTS = Path(__file__).parent / "artifacts"
PROMPT = "What are the symptoms of asthma?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(base, out, data, steps):
    from medtune.train.job import run_training

    return run_training(tiny_recipe(base, out, f"data.path={data}", "data.limit=null", "data.max_length=64",
                                    "data.eval_ratio=0", f"train.max_steps={steps}", "train.logging_steps=10",
                                    "train.packing=true", "lora.r=8", "train.seed=0", "train.eval_before=false")).run_dir


@pytest.fixture(scope="module")
def loaded_run(tiny_model_dir, tmp_path_factory):
    """A run whose base and tuned models both say something readable (a random tiny model only repeats newlines
    or broken bytes): the base is the tiny LLaMA taught one answer to PROMPT and merged; the run teaches another.
    ~5 s."""
    from medtune.export.merge import merge_run

    tmp = tmp_path_factory.mktemp("ui-run")
    for name, answer in (("a", "Wheezing and cough."), ("b", "See a doctor if you wheeze.")):
        (tmp / f"{name}.jsonl").write_text(f'{{"question": "{PROMPT}", "answer": "{answer}"}}\n' * 8)
    base = merge_run(_train(tiny_model_dir, tmp / "r1", tmp / "a.jsonl", 100), tmp / "base", dtype="fp32")
    return load_for_inference(str(_train(base, tmp / "r2", tmp / "b.jsonl", 60)), precision="fp32")


def test_stream_pieces_add_up_to_the_answer(loaded_run):
    knobs = dict(max_new_tokens=24, temperature=0.0, top_p=1.0)
    for use_adapter in (False, True):
        steps = list(stream_answer(loaded_run, PROMPT, None, use_adapter=use_adapter, **knobs))
        whole = generate(loaded_run, user_turn(PROMPT, None), use_adapter=use_adapter, **knobs)
        assert steps and steps[-1] == whole
        assert all(later.startswith(earlier) for earlier, later in zip(steps, steps[1:], strict=False))


def serve(demo):
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium on PATH (apt-get install chromium)")
def test_browser_sees_base_and_tuned_answers(loaded_run, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    knobs = dict(max_new_tokens=256, temperature=0.0, top_p=0.95)  # the page's defaults
    expected_base = generate(loaded_run, user_turn(PROMPT, None), use_adapter=False, **knobs)
    expected_tuned = generate(loaded_run, user_turn(PROMPT, None), use_adapter=True, **knobs)
    assert expected_base and expected_tuned and expected_base != expected_tuned
    print(f"base: {expected_base!r}  tuned: {expected_tuned!r}")

    demo = build_ui(loaded_run)
    url = serve(demo)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            assert "not medical advice" in page.locator("#notice").inner_text().lower()
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#submit").click()
            base, tuned = page.locator("#base-answer textarea"), page.locator("#tuned-answer textarea")
            page.wait_for_function(
                "([b, t]) => document.querySelector('#base-answer textarea').value === b && "
                "document.querySelector('#tuned-answer textarea').value === t",
                arg=[expected_base, expected_tuned], timeout=20_000)
            assert (base.input_value(), tuned.input_value()) == (expected_base, expected_tuned)
            shot = tmp_path / "ui_side_by_side.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        demo.close()
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
    assert shot.stat().st_size > 10_000


def test_plain_model_shows_one_column(tiny_model_dir):
    demo = build_ui(load_for_inference(str(tiny_model_dir), precision="fp32"))
    config = demo.get_config_file()
    by_id = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}
    assert by_id["base-answer"]["label"] == "Model" and by_id["tuned-answer"]["visible"] is False
    assert "not medical advice" in by_id["notice"]["value"].lower()


def test_launch_prints_no_share_hint(tiny_model_dir, capsys):
    from medtune.ui import launch_options

    demo = build_ui(load_for_inference(str(tiny_model_dir), precision="fp32"))
    capsys.readouterr()
    demo.queue().launch(**launch_options("127.0.0.1", free_port(), False), prevent_thread_lock=True)
    try:
        out = capsys.readouterr().out
    finally:
        demo.close()
    assert "share=True" not in out and "public link" not in out


def answer_fn(demo):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "answer")


def test_answers_sit_under_the_fact_check_notice_with_the_reference(tiny_model_dir):
    from medtune.run.card import NOT_FACT_CHECKED

    held_out = "How is gout treated?"
    demo = build_ui(load_for_inference(str(tiny_model_dir), precision="fp32"), references={held_out: "NSAIDs first."})
    config = demo.get_config_file()
    by_id = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}
    assert NOT_FACT_CHECKED in by_id["fact-check"]["value"] and "not fact-checked" in by_id["fact-check"]["value"].lower()
    assert by_id["reference"]["visible"] is True
    examples = next(c["props"] for c in config["components"] if c["type"] == "dataset")["samples"]
    assert [held_out] in examples  # the held-out prompts are offered first
    answer = answer_fn(demo)
    assert list(answer(held_out, "", 2, 0.0, 1.0))[-1][2] == "NSAIDs first."
    assert list(answer("What is acne?", "", 2, 0.0, 1.0))[-1][2] == ""  # no held-out row: no reference


def test_plain_model_has_no_reference_box_but_the_notice(tiny_model_dir):
    demo = build_ui(load_for_inference(str(tiny_model_dir), precision="fp32"))
    by_id = {c["props"].get("elem_id"): c["props"] for c in demo.get_config_file()["components"]
             if c["props"].get("elem_id")}
    assert by_id["reference"]["visible"] is False and "not fact-checked" in by_id["fact-check"]["value"].lower()

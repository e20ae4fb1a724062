# Two commands on a fresh machine with Python 3.10+:  make demo  |  make test
# Each creates .venv and installs what it needs, torch first (override: make demo TORCH='torch==2.5.1').
# The demo installs chatforge with its [hf] extra (PEFT for LoRA); the tests add their peers ([test]).
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=

$(VENV)/.torch:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	touch $@

$(VENV)/.installed-demo: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e ".[hf]"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e ".[hf,test]"
	touch $@ $(VENV)/.installed-demo

install: $(VENV)/.installed

demo: $(VENV)/.installed-demo
	$(BIN)/chatforge demo $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q $(ARGS)

.PHONY: install demo test

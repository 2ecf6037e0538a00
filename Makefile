# The two commands of the README. Each creates (or reuses) .venv in the repo
# and installs the project and its test dependencies into it.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test venv proto bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "gpuaas needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/gpuaas demo

test: venv
	$(BIN)/python -m pytest -q

proto: venv
	$(BIN)/python -m gpuaas.codegen

clean:
	rm -rf $(VENV) build *.egg-info

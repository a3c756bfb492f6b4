# Two commands do everything on a fresh machine:
#   make demo   set up .venv (pinned, CPU-tested set) and run the main job on synthetic faces
#   make test   lint + format check + the whole test suite (what CI runs via .ci/run)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DEMO_OUT ?= runs/demo

.PHONY: setup demo demo-quick test lint format bench clean

$(BIN)/facemae: pyproject.toml requirements/lock-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/lock-cpu.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/facemae

demo: setup
	$(BIN)/facemae demo --out $(DEMO_OUT)

demo-quick: setup
	$(BIN)/facemae demo --quick --out $(DEMO_OUT)

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

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# The README's two commands. Both set everything up first (scripts/setup.sh: .venv, torch policy, install).
VENV ?= .venv
BIN := $(VENV)/bin
TINY := .cache/tiny-llama

.PHONY: setup quickstart test docs clean gpu-check
setup: $(VENV)/.lorakit-setup

$(VENV)/.lorakit-setup: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

# A real QLoRA fine-tune of the embedded tiny model on the bundled dataset, offline, on CPU: preview the
# data, train, merge (with its verification table), then evaluate base versus tuned (gate: exact match).
quickstart: setup
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/tiny_model.py $(TINY)
	HF_HUB_OFFLINE=1 $(BIN)/lorakit data preview configs/quickstart.yaml --count 2
	HF_HUB_OFFLINE=1 $(BIN)/lorakit train configs/quickstart.yaml --overwrite
	HF_HUB_OFFLINE=1 $(BIN)/lorakit merge runs/quickstart
	HF_HUB_OFFLINE=1 $(BIN)/lorakit eval runs/quickstart --fail-under exact_match=0.5

# ruff first (seconds): lint and formatting are part of the test command, so CI keeps them. Then the
# suite over TEST_WORKERS pytest-xdist processes, one test file per worker at a time (a file's shared
# trained runs are built once, in its worker), the longest files first (tests/conftest.py: LONGEST_FIRST);
# each worker's torch uses one thread (tests/conftest.py).
TEST_WORKERS ?= 2
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The GPU validation in one call (scripts/gpu_check/): on a GPU machine with the wheels from scripts/gpu_wheels.sh,
# `make gpu-check` (results in $OUT); on a CPU machine, the reduced rehearsal with the venv's Python.
gpu-check:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# Regenerate docs/recipe.md from the schema and docs/plan.md from the planner (tests fail when stale).
docs: setup
	$(BIN)/python scripts/gen_recipe_docs.py
	$(BIN)/python scripts/gen_plan_docs.py

clean:
	rm -rf runs .cache

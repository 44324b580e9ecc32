# bidistill developer commands. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo demo-slides bench bench-accuracy docs clean

install: $(STAMP)
	@echo 'bidistill is installed in $(VENV): type `source $(BIN)/activate` to put it on PATH'

# Reinstall when the package metadata changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: install
	$(BIN)/bidistill demo --out demo_run
	@echo 'type `source $(BIN)/activate` to run the bidistill commands of the README'

# The demo from pixels: synthetic BCNB-layout slides, tiled and encoded (random-init encoder).
demo-slides: install
	$(BIN)/bidistill demo --from-slides --out demo_slides

bench: install
	$(BIN)/python benchmarks/run_all.py

# The config reference is generated from the pydantic models (a test fails when it is stale).
docs: install
	$(BIN)/python -m bidistill.config_docs > docs/config.md

# Every method on six cohorts with a known Bayes limit: 5 training seeds, about 55 min on two
# cores; `make bench-accuracy ARGS="--seeds 2"` (about 20 min) for a quicker look.
bench-accuracy: install
	$(BIN)/python benchmarks/accuracy/run.py $(ARGS)

clean:
	rm -rf $(VENV) demo_run demo_slides .pytest_cache

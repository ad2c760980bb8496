# slidr: `make help` lists the targets. Everything runs inside .venv, created by `make install`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   ?= var/demo
BENCH_CLICKS ?= 1000000

.DEFAULT_GOAL := help
.PHONY: help install demo test lint bench bench-real bench-proxy-lies clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(BIN)/.installed ## create .venv with slidr and everything it needs (training, local stack, tests)

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,local,dev]'
	touch $@

demo: install ## the whole loop on a fresh machine: stack, simulate, train, stream, decide, report
	$(BIN)/slidr demo --dir $(DEMO)

test: install ## run the test suite (starts and stops its own broker and Redis)
	$(BIN)/python -m pytest -q --durations=12

# Packages the type checker holds clean: every package (the tests are not checked).
MYPY_PACKAGES ?= events features data models stream lifecycle slidr

lint: install ## ruff (check and format), the layer contract (import-linter), mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy $(MYPY_PACKAGES)

bench: install ## benchmarks: featurization and training on 1M clicks, the scoring path, the pipeline
	$(BIN)/slidr bench --clicks $(BENCH_CLICKS)

bench-real: install ## AUC of slidr and its peers (one-hot logistic, LightGBM with two kinds of counts) on the TalkingData sample, training seeds 1-7 (~10 min)
	$(BIN)/python -m models.bench_real

bench-proxy-lies: install ## bot recall of slidr and LightGBM, and slidr's true human FPR, on simulated worlds where purchasers are unrepresentative, seeds 1-8 (16-70 min)
	$(BIN)/python -m models.bench_proxy_lies

clean: ## remove local state (var/), keeps .venv
	rm -rf var

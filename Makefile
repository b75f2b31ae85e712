# One entry point for everything: `make demo`, `make test`, `make lint`.
# The first target that needs it creates .venv and installs recstream with everything it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: install demo up test test-fast lint check deploy-tools browser-tools bench bench-e2e bench-scaleout bench-restart bench-memory bench-soak bench-vectors clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[worker,dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## embedded broker + worker + demo catalogue + simulated users, live (Ctrl-C stops)
	$(BIN)/recstream demo

up: $(STAMP)  ## embedded broker + topics + worker on 127.0.0.1:9092
	$(BIN)/recstream up

test: $(STAMP) deploy-tools browser-tools  ## every test: unit, vector-store congruence, encoder, end to end on the embedded stack
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## everything but the end-to-end stack tests
	$(BIN)/python -m pytest -m "not stack"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check: lint test

deploy-tools:  ## docker-compose (Debian package), which tests/test_deploy.py runs as `config`
	@command -v docker-compose >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; \
	  else echo "docker-compose not installed (needs root and apt-get): its check in tests/test_deploy.py will skip"; fi; }

browser-tools:  ## headless Chromium (Debian package) and a font, for the console's browser tests
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; \
	  else echo "chromium not installed (needs root and apt-get): tests/test_console_browser.py will skip"; fi; }

bench: $(STAMP)  ## event-to-recommendation latency on the embedded stack
	mkdir -p bench-out
	$(BIN)/python benchmarks/latency.py --json bench-out/latency.json

bench-e2e: $(STAMP)  ## throughput and latency under load, beside Faust's no-op ceiling and a raw loop
	mkdir -p bench-out
	$(BIN)/python benchmarks/e2e.py --rate 500 --duration 60 --json bench-out/e2e-500.json
	$(BIN)/python benchmarks/e2e.py --max --events 20000 --json bench-out/e2e-max.json

bench-scaleout: $(STAMP)  ## one worker against ingest + two recommend workers on four partitions; hand-over
	mkdir -p bench-out
	$(BIN)/python benchmarks/scaleout.py --json bench-out/scaleout.json

bench-restart: $(STAMP)  ## restart to first list with the tables in RocksDB against in memory
	mkdir -p bench-out
	$(BIN)/python benchmarks/restart.py --json bench-out/restart.json

bench-memory: $(STAMP)  ## bytes of state per user and per item, projected to a million
	mkdir -p bench-out
	$(BIN)/python benchmarks/memory.py --json bench-out/memory.json

bench-soak: $(STAMP)  ## 20 minutes at 100 events/s: worker memory, lag and latency over time
	mkdir -p bench-out
	$(BIN)/python benchmarks/soak.py --rate 100 --duration 1200 --users 1000 --items 10000 \
		--window 30 --json bench-out/soak.json --plot docs/img/soak.png

bench-vectors: $(STAMP)  ## Qdrant Edge HNSW recall and latency at 100,000 items (1M: see docs)
	mkdir -p bench-out
	$(BIN)/python benchmarks/vector_scale.py --items 100000 --json bench-out/vector-scale-100k.json

clean:
	rm -rf $(VENV) .data bench-out .pytest_cache .mypy_cache .ruff_cache

# `make demo` and `make test` set everything up on a fresh machine (Python 3.11+ with venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

# The demo needs only proxykit itself; tests, lint and the benchmark need the test toolchain too.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/proxykit serve --demo

lint: $(BIN)/.installed-test
	$(BIN)/ruff check proxykit tests examples
	$(BIN)/mypy

# pytest exits 5 when it collected nothing: that must fail, never pass quietly.
test: lint
	$(BIN)/pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; fi; \
	exit $$status

# Performance is measured here, never asserted in tests: wrk and redis-server from Debian,
# LiteLLM's proxy (the version the issue's anchors used) in a throwaway virtualenv outside the
# repo and, where Node 20 and npm are installed, Portkey's gateway beside it, all in one
# interleaved run on this machine. BENCH_ARGS=--quick for a short try.
LITELLM_VENV ?= /tmp/proxykit-bench-litellm
PORTKEY_DIR ?= /tmp/proxykit-bench-portkey
PORTKEY_SERVER = $(PORTKEY_DIR)/node_modules/@portkey-ai/gateway/build/start-server.js
BENCH_ARGS ?=

bench: $(BIN)/.installed-test
	command -v wrk >/dev/null && command -v redis-server >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq wrk redis-server)
	test -x $(LITELLM_VENV)/bin/litellm || ($(PYTHON) -m venv $(LITELLM_VENV) && \
		$(LITELLM_VENV)/bin/pip install --quiet 'litellm[proxy]==1.106.2' httptools uvloop)
	if command -v npm >/dev/null && ! test -f $(PORTKEY_SERVER); then \
		mkdir -p $(PORTKEY_DIR) && cp tests/benchmarks/portkey/package.json $(PORTKEY_DIR)/ && \
		npm install --prefix $(PORTKEY_DIR) --no-audit --no-fund --silent; fi
	$(BIN)/python -m tests.benchmarks.key_choice
	$(BIN)/python -m tests.benchmarks.run --litellm $(LITELLM_VENV)/bin/litellm \
		$$(test -f $(PORTKEY_SERVER) && echo --portkey $(PORTKEY_SERVER)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info

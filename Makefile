# paysaga: the two set-up commands are `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test bench lint typecheck system-deps venv clean

# The type check, one command for `lint`, `test` and `typecheck`: `paysaga.*` resolves through
# typecheck/paysaga/ (symlinks to the top-level folders); the settings are [tool.mypy].
TYPECHECK := $(VENV)/bin/mypy -p paysaga -p tests

# Java 17 and Maven run the local Apache Kafka node, promtool checks the alert rules; install
# them if the machine lacks them.
system-deps:
	@if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q openjdk-17-jdk-headless maven; \
	  else echo "paysaga needs java (17+) and mvn: install them (apt-get install openjdk-17-jdk-headless maven)"; exit 1; fi; \
	fi
	@# promtool (Debian's prometheus package) checks the alert rules and /metrics in the tests.
	@if ! command -v promtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	  else echo "paysaga's tests need promtool: install it (apt-get install prometheus)"; exit 1; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: system-deps $(VENV)/.installed

## Local broker, topics, worker, upstream simulator and live progress; Ctrl-C stops it all.
run: venv
	$(VENV)/bin/paysaga demo

## The whole test suite against a real local Kafka broker the suite starts itself.
test: venv
	$(VENV)/bin/ruff check streams agents tables schemas domain tests
	$(TYPECHECK)
	$(PY) -m pytest -p no:cacheprovider

## The benchmark harness (figures are reported, never asserted).
bench: venv
	$(VENV)/bin/paysaga bench

lint: venv
	$(VENV)/bin/ruff check streams agents tables schemas domain tests
	$(VENV)/bin/ruff format --check streams agents tables schemas domain tests
	$(TYPECHECK)

## mypy over the package and the tests (also part of `lint` and `test`).
typecheck: venv
	$(TYPECHECK)

clean:
	$(VENV)/bin/paysaga broker down || true
	rm -rf data

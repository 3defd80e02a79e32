# Agent Sessions: every command a developer or CI needs. `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard proto/agentsessions/v1/*.proto)
STUBS := clients/python/agentsessions/v1
BUF := node_modules/.bin/buf

.PHONY: install run test proto check lint typecheck buflint stubs-check bench postgres clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e clients/python -e '.[dev]'
	touch $(STAMP)

## Start the server on 127.0.0.1:50051 with the SQLite default (./var/sessiond.db).
run: install
	$(BIN)/sessiond serve

## The whole suite, on SQLite and on PostgreSQL (started here if it is down).
test: install postgres
	$(PY) -m pytest

postgres:
	@bash .ci/postgres-up

## Regenerate the committed stubs and .pyi files from proto/.
proto: install
	bash .ci/protogen $(STUBS)

stubs-check: install
	@tmp=$$(mktemp -d) && bash .ci/protogen $$tmp/v1 && \
	  diff -r -x __init__.py -x __pycache__ $$tmp/v1 $(STUBS) && rm -rf $$tmp && echo "stubs: in step with proto/"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

$(BUF):
	npm install --no-save --no-audit --no-fund --silent @bufbuild/buf@1.75.0

buflint: $(BUF)
	cd proto && ../$(BUF) lint

## Everything CI could ask for: lint, types, buf lint, stub drift, tests.
check: lint typecheck buflint stubs-check test

## Benchmarks: ratios against a bare grpc.aio server measured in the same run.
bench: install postgres
	$(PY) -m bench

clean:
	rm -rf $(VENV) var node_modules .pytest_cache .mypy_cache .ruff_cache

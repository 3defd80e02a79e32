# Agent Sessions: every command a developer or CI needs. `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard proto/agentsessions/v1/*.proto)
STUBS := clients/python/agentsessions/v1
# Node.js tooling (the buf CLI, the Node client example) comes from clients/node/package-lock.json.
NODE_DIR := clients/node
NODE_MODULES := $(NODE_DIR)/node_modules/.package-lock.json
BUF := $(NODE_DIR)/node_modules/.bin/buf

.PHONY: install run test proto descriptor node check lint typecheck buflint stubs-check bench postgres clean

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

## The contract as a FileDescriptorSet (imports and comments included), for clients with no generated code.
## Built, not committed: the .proto files stay the one source, so there is nothing to drift.
descriptor: install
	bash .ci/descriptor build/agentsessions.v1.binpb
	@echo "descriptor: build/agentsessions.v1.binpb"

stubs-check: install
	@tmp=$$(mktemp -d) && bash .ci/protogen $$tmp/v1 && \
	  diff -r -x __init__.py -x __pycache__ $$tmp/v1 $(STUBS) && rm -rf $$tmp && echo "stubs: in step with proto/"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

node: $(NODE_MODULES)

# `npm install` with the lock file, not `npm ci`: the lock pins every version, but npm ci also wants an
# entry for each platform build of buf, and the registry here serves only the Linux ones.
$(NODE_MODULES): $(NODE_DIR)/package-lock.json
	npm install --prefix $(NODE_DIR) --no-save --no-audit --no-fund --loglevel=error

$(BUF): $(NODE_MODULES)
	@:

buflint: $(BUF)
	cd proto && ../$(BUF) lint

## Everything CI could ask for: lint, types, buf lint, stub drift, tests.
check: lint typecheck buflint stubs-check test

## Benchmarks: ratios against a bare grpc.aio server measured in the same run.
bench: install postgres
	$(PY) -m bench

clean:
	rm -rf $(VENV) var build node_modules $(NODE_DIR)/node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis

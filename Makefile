PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint typecheck bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

## make run: bootstrap the CA into certs/ and start the gateway, a demo mTLS upstream and the demo mesh (sidecars)
run: $(VENV)/.base
	$(PY) -m mesh_gateway demo --dir certs

## make test: lint, type-check, import layers, policy tests and the whole pytest suite
test: $(VENV)/.test
	$(VENV)/bin/ruff check mesh_gateway tests bench
	$(VENV)/bin/mypy --strict mesh_gateway
	$(VENV)/bin/lint-imports
	$(PY) -m mesh_gateway policy test policies
	$(PY) -m mesh_gateway policy test mesh_gateway/demo/policies
	$(PY) -m mesh_gateway policy test deploy/compose/policies
	$(PY) -m pytest -q -p no:cacheprovider
	MESH_TEST_LOOP=asyncio $(PY) -m pytest -q -p no:cacheprovider tests/test_edge_e2e.py tests/test_edge_security.py \
		tests/test_edge_h1.py
	MESH_TEST_HTTP1_SERVER=aiohttp $(PY) -m pytest -q -p no:cacheprovider tests/test_edge_e2e.py \
		tests/test_edge_security.py tests/test_websocket.py tests/test_h2.py

## make bench: direct vs nginx vs gateway on the same TLS → mTLS job (installs wrk and nginx with apt-get if missing)
##   BENCH_ARGS="--variants tls,full --duration 20 --rounds 5 --profile prof/" for a subset, longer runs, py-spy profiles
bench: $(VENV)/.base
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# The two commands a user needs: `make demo` and `make test`. Both bootstrap first.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=
PYTEST_ARGS ?=
# Test files run in parallel (pytest-xdist), a file per worker: most of the suite waits on
# brokers and child processes. PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= auto

.PHONY: bootstrap demo test lint bench clean

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/knet demo $(DEMO_ARGS)

# pytest exits 5 when it collected no test: that is a failure of the suite, say so.
test: bootstrap
	@$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy

bench: bootstrap
	$(VENV)/bin/knet bench codec --json out/bench-codec.json
	$(VENV)/bin/knet bench runtime --json out/bench-runtime.json

clean:
	rm -rf out build *.egg-info .pytest_cache

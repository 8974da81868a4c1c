# quantlab: `make course` runs the course, `make test` runs the tests. Both set everything up first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= mini
OUT    ?= build
# Where torch comes from. Empty means the default index; a CPU-only laptop can pass the PyTorch
# CPU wheel index here to avoid the CUDA build.
TORCH_INDEX ?=

# The torch pin is read from pyproject.toml, the one place versions are set.
TORCH_PIN := $(shell sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
STAMP     := $(VENV)/.installed

.PHONY: setup course test lab colab clean clean-all

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "quantlab needs Python 3.11+; this is " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing $(TORCH_PIN) first, so that nothing else pulls a different torch"
	$(PY) -m pip install --quiet "$(TORCH_PIN)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

course: $(STAMP)
	$(PY) -m quantlab.course --model $(MODEL) --out $(OUT)

# The unit tests, and every chapter run once as stored (on the mini model) through papermill
# (tests/test_notebooks.py), which stops at a chapter's first error and names its cell.
test: $(STAMP)
	$(PY) -m pytest tests -p no:cacheprovider

# JupyterLab refuses to start as root unless told it may: containers and cloud machines often run as root.
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

# The Colab copies of the chapters (colab/), regenerated from notebooks/; tests/test_lab_colab.py checks they are current.
colab: $(STAMP)
	$(PY) -m quantlab.lab.colab

clean:
	rm -rf $(OUT) .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

clean-all: clean
	rm -rf $(VENV) $${QUANTLAB_CACHE:-$$HOME/.cache/quantlab}

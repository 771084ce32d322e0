# make demo: set up .venv, write the demo corpus, train on 2 processes, print results.
# make test: set up .venv, run the test suite.
PYTHON     ?= python3
VENV       ?= .venv
# The torch build to install before the project; e.g. TORCH_SPEC="torch==2.13.0+cu126"
# with PIP_EXTRA="--index-url https://download.pytorch.org/whl/cu126" for CUDA.
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA  ?=
NPROC      ?= 2
DEMO_DIR   ?= data/demo
PYTEST_ARGS ?=

PY := $(VENV)/bin/python

.PHONY: install demo demo-data test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(DEMO_DIR)/.done: $(VENV)/.installed data_pipeline/demo.py
	rm -rf $(DEMO_DIR)
	$(PY) -m data_pipeline demo $(DEMO_DIR)/raw
	$(PY) -m data_pipeline write $(DEMO_DIR)/raw/train.jsonl $(DEMO_DIR)/train --max-samples 500
	$(PY) -m data_pipeline write $(DEMO_DIR)/raw/heldout.jsonl $(DEMO_DIR)/heldout --max-samples 250
	touch $@

demo-data: $(DEMO_DIR)/.done

demo: $(DEMO_DIR)/.done
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m train experiment=demo \
		data.train=$(DEMO_DIR)/train data.heldout=$(DEMO_DIR)/heldout

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_DIR) outputs

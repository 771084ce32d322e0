# make demo: set up .venv, write the demo corpus, pretrain on 2 processes, then
# fine-tune a classifier on 10 labels per class from the pretrained model and
# from scratch, print results.
# make test: set up .venv, lint, run the test suite (SLURM tests only with MM_TEST_SLURM=1).
# make test-fast: the unit tests only (no processes launched), for the edit-test loop.
PYTHON     ?= python3
VENV       ?= .venv
# The torch build to install before the project; e.g. TORCH_SPEC="torch==2.13.0+cu126"
# with PIP_EXTRA="--index-url https://download.pytorch.org/whl/cu126" for CUDA.
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA  ?=
NPROC      ?= 2
DEMO_DIR   ?= data/demo
# Where the demo's three runs go (a new directory per `make demo`).
DEMO_RUN   ?= outputs/demo-$(shell date +%Y%m%d-%H%M%S)
LABELS_PER_CLASS ?= 10
PYTEST_ARGS ?=

PY := $(VENV)/bin/python

.PHONY: install demo demo-run demo-data test test-fast lint gpu-check clean

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
	$(PY) -m data_pipeline write $(DEMO_DIR)/raw/train.jsonl $(DEMO_DIR)/labelled --max-samples 500 \
		--per-class $(LABELS_PER_CLASS) --label-key label
	touch $@

demo-data: $(DEMO_DIR)/.done

demo: $(DEMO_DIR)/.done
	$(MAKE) --no-print-directory demo-run RUN=$(DEMO_RUN)

# One directory for the three runs: RUN is fixed once by `demo` above.
demo-run:
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m train experiment=demo \
		data.train=$(DEMO_DIR)/train data.heldout=$(DEMO_DIR)/heldout hydra.run.dir=$(RUN)/pretrain
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m train experiment=demo_finetune \
		task.init=$(RUN)/pretrain/export/model.safetensors data.train=$(DEMO_DIR)/labelled \
		data.heldout=$(DEMO_DIR)/heldout hydra.run.dir=$(RUN)/finetune_pretrained
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m train experiment=demo_finetune \
		task.init=none data.train=$(DEMO_DIR)/labelled data.heldout=$(DEMO_DIR)/heldout \
		hydra.run.dir=$(RUN)/finetune_scratch
	$(PY) -m train.demo_report $(RUN) --labels-per-class $(LABELS_PER_CLASS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not integration and not slurm and not gpu" $(PYTEST_ARGS)

# On a CUDA machine: the GPU tests (NCCL, bf16, fp16 loss scaling, fused
# attention kernels) and the speed benchmarks at model=large, in one go.
gpu-check: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu -p no:cacheprovider
	$(PY) benchmarks/model_throughput.py --model large --no-compile
	$(PY) benchmarks/engine_overhead.py --model large --precision bf16 --repeats 1 --steps 5

clean:
	rm -rf $(DEMO_DIR) outputs

# Every target sets itself up from requirements.txt into .venv on first use.
# Variables: DATA (dataset root), TEST_DATA (the real data the tests read when present), DEVICE, PYTHON.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data
TEST_DATA ?= ../shared/data
DEVICE ?= auto

.PHONY: setup test demo bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

# The full test suite (CPU, a few minutes on 2 cores).
test: setup
	METALEARN_SHARED_DATA=$(abspath $(TEST_DATA)) $(PY) -m pytest -q tests

# MAML with and without gradient sharing on Omniglot, then both runs side by side.
DEMO_FLAGS = --dataset omniglot --data-root $(DATA) --cache-dir .cache --download --device $(DEVICE) --ways 5 --shots 1 --tasks 5 \
	--epochs 5 --iters-per-epoch 30 --val-tasks 100 --test-tasks 200 --seed 1
DATA_HINT = echo "hint: no Omniglot under DATA=$(DATA) and no network to download it; point DATA at a folder holding omniglot-py/ (torchvision's layout) or omniglot-small/, e.g. make demo DATA=../shared/data"; exit 1
demo: setup
	rm -rf runs/demo
	$(PY) maml_gs.py $(DEMO_FLAGS) --gs --out runs/demo/maml_gs || { $(DATA_HINT); }
	$(PY) maml_gs.py $(DEMO_FLAGS) --no-gs --out runs/demo/maml
	$(PY) tools/compare.py runs/demo/maml runs/demo/maml_gs

# Speed and memory against a plain loop and the peers (higher, torchopt: installed here when possible).
bench: setup
	$(VENV)/bin/python -m pip install --quiet -r requirements-bench.txt || echo "peers not installed: the bench skips them"
	$(PY) tools/bench.py --device $(DEVICE)

clean-venv:
	rm -rf $(VENV)

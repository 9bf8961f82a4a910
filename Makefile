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
DATA_HINT = echo "hint: if the error above says that no Omniglot was found under DATA=$(DATA) (and none could be downloaded), point DATA at a folder holding omniglot-py/ (torchvision's layout) or omniglot-small/, e.g. make demo DATA=../shared/data"; exit 1
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

# ---- Reproducing the papers -------------------------------------------------------------------------
# Variables: DATA (data root), DEVICE, SEEDS (one run per seed), RUNNER (a prefix for every run, e.g.
# `srun --gres=gpu:1`). Targets are independent runs: `make -j N` runs N at once. A finished run (its
# result.json exists) is skipped; an interrupted one is resumed from its last checkpoint.
SEEDS ?= 1
RUNNER ?=
# $(call run,<algorithm file>,<flags>,<run directory>)
run = if [ -f $(3)/result.json ]; then echo "finished, skipped: $(3)"; \
	elif [ -f $(3)/config.json ]; then $(RUNNER) $(PY) $(1) --resume $(3) --device $(DEVICE); \
	else $(RUNNER) $(PY) $(1) $(2) --data-root $(DATA) --device $(DEVICE) --out $(3); fi

# Paper 002 (gradient sharing), Table 1: 5-way 5-shot, CUB and MiniImagenet, task batch 5 and 1, each
# method without (OG, --no-gs) and with (GS, --gs) gradient sharing. Epochs: appendix A.3 (task batch 5:
# 150 on CUB, 250 on MiniImagenet; task batch 1: five times as many). Everything else is the default
# protocol. MAML++ clamps meta-gradients to ±10 on MiniImagenet, as its reference code does.
EPOCHS_cub_t5 = 150
EPOCHS_cub_t1 = 750
EPOCHS_miniimagenet_t5 = 250
EPOCHS_miniimagenet_t1 = 1250
EXTRA_mamlpp_miniimagenet = --clip-grad 10
TABLE1_ROWS = $(foreach m,maml metasgd mamlpp,$(foreach d,cub miniimagenet,$(foreach t,t5 t1,table1-$(m)-$(d)-$(t))))

# One file target per run (its result.json): make skips finished runs and parallelises with -j.
# $(call table1_run,<method>,<dataset>,t<tasks>,og|gs,<seed>)
define table1_run
runs/table1/$(1)_$(4)__$(2)__5w5s__$(3)__$(5)/result.json: | setup
	$$(call run,$(1)_gs.py,--dataset $(2) --ways 5 --shots 5 --tasks $(3:t%=%) --epochs $$(EPOCHS_$(2)_$(3)) $$(EXTRA_$(1)_$(2)) $(if $(filter gs,$(4)),--gs,--no-gs) --seed $(5),$$(@D))
endef
# table1-<method>-<dataset>-t<tasks>: one row of Table 1, its OG and GS runs for every seed.
define table1_row
.PHONY: table1-$(1)-$(2)-$(3)
table1-$(1)-$(2)-$(3): $(foreach gs,og gs,$(foreach seed,$(SEEDS),runs/table1/$(1)_$(gs)__$(2)__5w5s__$(3)__$(seed)/result.json))
$(foreach gs,og gs,$(foreach seed,$(SEEDS),$(eval $(call table1_run,$(1),$(2),$(3),$(gs),$(seed)))))
endef
$(foreach row,$(TABLE1_ROWS),$(eval $(call table1_row,$(word 2,$(subst -, ,$(row))),$(word 3,$(subst -, ,$(row))),$(word 4,$(subst -, ,$(row))))))

.PHONY: reproduce-table1
reproduce-table1: $(TABLE1_ROWS)

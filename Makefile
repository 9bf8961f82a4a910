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
# `srun --gres=gpu:1`), RUNS (where the run directories go, default runs). Targets are independent runs:
# `make -j N` runs N at once. A finished run (its result.json exists) is skipped; an interrupted one is
# resumed from its last checkpoint. `make -n <target>` prints the commands.
SEEDS ?= 1
RUNNER ?=
RUNS ?= runs
# $(call run,<algorithm file>,<flags>,<run directory>)
run = if [ -f $(3)/result.json ]; then echo "finished, skipped: $(3)"; \
	elif [ -f $(3)/config.json ]; then $(RUNNER) $(PY) $(1) --resume $(3) --device $(DEVICE); \
	else $(RUNNER) $(PY) $(1) $(2) --data-root $(DATA) --device $(DEVICE) --out $(3); fi
# One file target per run, its result.json: make skips finished runs and parallelises them with -j.
# $(eval $(call run_rule,<algorithm file>,<flags>,<run directory>))
define run_rule
$(3)/result.json: | setup
	$$(call run,$(1),$(strip $(2)),$$(@D))
endef
# $(call word_at,<n>,<row name>): the n-th dash-separated field of a row target's name, e.g. table1-maml-cub-t5.
word_at = $(word $(1),$(subst -, ,$(2)))

# Paper 002 (gradient sharing), Table 1: 5-way 5-shot, CUB and MiniImagenet, task batch 5 and 1, each
# method without (OG, --no-gs) and with (GS, --gs) gradient sharing. Epochs: appendix A.3 (task batch 5:
# 150 on CUB, 250 on MiniImagenet; task batch 1: five times as many). Everything else is the default
# protocol. MAML++ clamps meta-gradients to ±10 on MiniImagenet, as its reference code does.
GS_METHODS = maml metasgd mamlpp
GS_DATASETS = cub miniimagenet
GS_TASKS = t5 t1
EPOCHS_cub_t5 = 150
EPOCHS_cub_t1 = 750
EPOCHS_miniimagenet_t5 = 250
EPOCHS_miniimagenet_t1 = 1250
EXTRA_mamlpp_miniimagenet = --clip-grad 10
gs_flag = $(if $(filter gs,$(1)),--gs,--no-gs)
TABLE1_ROWS = $(foreach m,$(GS_METHODS),$(foreach d,$(GS_DATASETS),$(foreach t,$(GS_TASKS),table1-$(m)-$(d)-$(t))))
table1_dir = $(RUNS)/table1/$(1)_$(4)__$(2)__5w5s__$(3)__$(5)

# table1-<method>-<dataset>-t<tasks>: one row of Table 1, its OG and GS runs for every seed.
# $(call table1_row,<method>,<dataset>,t<tasks>)
define table1_row
.PHONY: table1-$(1)-$(2)-$(3)
table1-$(1)-$(2)-$(3): $(foreach gs,og gs,$(foreach seed,$(SEEDS),$(call table1_dir,$(1),$(2),$(3),$(gs),$(seed))/result.json))
$(foreach gs,og gs,$(foreach seed,$(SEEDS),$(eval $(call run_rule,$(1)_gs.py,--dataset $(2) --ways 5 --shots 5 \
	--tasks $(3:t%=%) --epochs $(EPOCHS_$(2)_$(3)) $(EXTRA_$(1)_$(2)) $(call gs_flag,$(gs)) --seed $(seed),$(call \
	table1_dir,$(1),$(2),$(3),$(gs),$(seed))))))
endef
$(foreach row,$(TABLE1_ROWS),$(eval $(call table1_row,$(call word_at,2,$(row)),$(call word_at,3,$(row)),$(call word_at,4,$(row)))))

.PHONY: reproduce-table1
reproduce-table1: $(TABLE1_ROWS)

# Paper 002, Figures 4-11 (appendix C): the meta-validation curves (Figures 4, 6, 8, 10) and the σ(m), σ(λ)
# curves (5, 7, 9, 11) of every panel: method (column) × {1, 5}-shot × task batch {5, 1} (row), each OG and
# GS, on CUB (Figures 4, 5, 8, 9) and MiniImagenet (6, 7, 10, 11), with the default inner lr 0.1 (4-7) and
# 10× that, 1.0 (8-11; Meta-SGD's α and MAML++'s LSLR rates start there too). Epochs and flags as Table 1's.
# The 5-shot panels at inner lr 0.1 are Table 1's runs: their run directories are Table 1's, not run twice.
FIGURE_LRS = 0.1 1.0
FIGURE_SHOTS = 1 5
# $(call figure_dir,<method>,<dataset>,<shots>,t<tasks>,<inner lr>,og|gs,<seed>)
figure_is_table1 = $(and $(filter 5,$(3)),$(filter 0.1,$(5)))
figure_dir = $(if $(call figure_is_table1,$(1),$(2),$(3),$(4),$(5)),$(call table1_dir,$(1),$(2),$(4),$(6),$(7)),$(RUNS)/figures/$(1)_$(6)__$(2)__5w$(3)s__$(4)__lr$(5)__$(7))
# figure-<method>-<dataset>-<shots>s-t<tasks>-lr<inner lr>: one panel, its OG and GS runs for every seed.
figure_panel_name = figure-$(1)-$(2)-$(3)s-$(4)-lr$(5)
figure_panels = $(foreach s,$(FIGURE_SHOTS),$(foreach t,$(GS_TASKS),$(foreach m,$(GS_METHODS),$(call figure_panel_name,$(m),$(1),$(s),$(t),$(2)))))
FIGURE_PANELS = $(foreach lr,$(FIGURE_LRS),$(foreach d,$(GS_DATASETS),$(call figure_panels,$(d),$(lr))))

# $(call figure_panel,<method>,<dataset>,<shots>,t<tasks>,<inner lr>)
define figure_panel
.PHONY: $(call figure_panel_name,$(1),$(2),$(3),$(4),$(5))
$(call figure_panel_name,$(1),$(2),$(3),$(4),$(5)): $(foreach gs,og gs,$(foreach seed,$(SEEDS),$(call figure_dir,$(1),$(2),$(3),$(4),$(5),$(gs),$(seed))/result.json))
$(if $(call figure_is_table1,$(1),$(2),$(3),$(4),$(5)),,$(foreach gs,og gs,$(foreach seed,$(SEEDS),$(eval $(call \
	run_rule,$(1)_gs.py,--dataset $(2) --ways 5 --shots $(3) --tasks $(4:t%=%) --inner-lr $(5) --epochs \
	$(EPOCHS_$(2)_$(4)) $(EXTRA_$(1)_$(2)) $(call gs_flag,$(gs)) --seed $(seed),$(call \
	figure_dir,$(1),$(2),$(3),$(4),$(5),$(gs),$(seed)))))))
endef
$(foreach panel,$(FIGURE_PANELS),$(eval $(call figure_panel,$(call word_at,2,$(panel)),$(call word_at,3,$(panel)),$(patsubst \
	%s,%,$(call word_at,4,$(panel))),$(call word_at,5,$(panel)),$(patsubst lr%,%,$(call word_at,6,$(panel))))))

# figures-<dataset>-lr<inner lr>: every panel of one figure pair (CUB: Figures 4, 5 at lr 0.1, 8, 9 at lr 1.0;
# MiniImagenet: 6, 7 and 10, 11).
FIGURE_GROUPS = $(foreach lr,$(FIGURE_LRS),$(foreach d,$(GS_DATASETS),figures-$(d)-lr$(lr)))
$(foreach lr,$(FIGURE_LRS),$(foreach d,$(GS_DATASETS),$(eval figures-$(d)-lr$(lr): $(call figure_panels,$(d),$(lr)))))
.PHONY: reproduce-figures $(FIGURE_GROUPS)
reproduce-figures: $(FIGURE_GROUPS)

# Paper 003 (CML), MiniImagenet 5-way 1- and 5-shot, CML on MAML and on MAML++: the commands of cml.py's
# docstring (MAML: the reference's settings; MAML++: mamlpp_gs.py's defaults, task batch 2).
CML_BASES = maml mamlpp
CML_SHOTS = 1 5
CML_TASKS_maml = 4
CML_TASKS_mamlpp = 2
CML_FLAGS_maml = --tasks $(CML_TASKS_maml) --inner-steps 1 --inner-lr 0.5 --filters 64 --outer-lr 1e-3 --epochs 300 --iters-per-epoch 100
CML_FLAGS_mamlpp = --tasks $(CML_TASKS_mamlpp) --epochs 250 --clip-grad 10
CML_ROWS = $(foreach b,$(CML_BASES),$(foreach s,$(CML_SHOTS),cml-$(b)-$(s)s))
cml_dir = $(RUNS)/cml/cml_$(1)__miniimagenet__5w$(2)s__t$(CML_TASKS_$(1))__$(3)
# cml-<base>-<shots>s: one cell, a run per seed. $(call cml_row,<base>,<shots>)
define cml_row
.PHONY: cml-$(1)-$(2)s
cml-$(1)-$(2)s: $(foreach seed,$(SEEDS),$(call cml_dir,$(1),$(2),$(seed))/result.json)
$(foreach seed,$(SEEDS),$(eval $(call run_rule,cml.py,--dataset miniimagenet --base $(1) --shots $(2) \
	$(CML_FLAGS_$(1)) --seed $(seed),$(call cml_dir,$(1),$(2),$(seed)))))
endef
$(foreach row,$(CML_ROWS),$(eval $(call cml_row,$(call word_at,2,$(row)),$(patsubst %s,%,$(call word_at,3,$(row))))))
.PHONY: reproduce-cml
reproduce-cml: $(CML_ROWS)

# Paper 004 (LWDGH): the commands of lwdgh.py's docstring. Variants: maml (--p-min 1 --p-max 1: always
# explore, plain MAML with the same settings and the GCI logged), lwdgh (--no-ee: always exploit),
# lwdgh_ee (the full method). Table 1: MiniImagenet 5-way 1/5-shot, MAML and MAML+LWDGH(+EE); Table 4:
# the same on CUB; Table 5: the ablation, MiniImagenet 1-shot, 20 epochs, all three variants (GCI column).
# Conv4 with 32 filters, 200 meta-iterations per epoch; 300 epochs for Tables 1 and 4 (our assumption: the
# paper gives none); every other setting is lwdgh.py's default (the paper's).
LWDGH_FILTERS = 32
LWDGH_ITERS = 200
LWDGH_VARIANT_maml = --p-min 1 --p-max 1
LWDGH_VARIANT_lwdgh = --no-ee
LWDGH_VARIANT_lwdgh_ee =
LWDGH_DATASET_table1 = miniimagenet
LWDGH_DATASET_table4 = cub
LWDGH_DATASET_table5 = miniimagenet
LWDGH_SHOTS_table1 = 1 5
LWDGH_SHOTS_table4 = 1 5
LWDGH_SHOTS_table5 = 1
LWDGH_EPOCHS_table1 = 300
LWDGH_EPOCHS_table4 = 300
LWDGH_EPOCHS_table5 = 20
LWDGH_VARIANTS_table1 = maml lwdgh_ee
LWDGH_VARIANTS_table4 = maml lwdgh_ee
LWDGH_VARIANTS_table5 = maml lwdgh lwdgh_ee
LWDGH_TABLES = table1 table4 table5
lwdgh_dir = $(RUNS)/lwdgh/$(1)_$(2)__$(LWDGH_DATASET_$(1))__5w$(3)s__$(4)
# lwdgh-<table>: its runs, every variant × shots × seed. $(call lwdgh_table,<table>)
define lwdgh_table
.PHONY: lwdgh-$(1)
lwdgh-$(1): $(foreach v,$(LWDGH_VARIANTS_$(1)),$(foreach s,$(LWDGH_SHOTS_$(1)),$(foreach seed,$(SEEDS),$(call \
	lwdgh_dir,$(1),$(v),$(s),$(seed))/result.json)))
$(foreach v,$(LWDGH_VARIANTS_$(1)),$(foreach s,$(LWDGH_SHOTS_$(1)),$(foreach seed,$(SEEDS),$(eval $(call \
	run_rule,lwdgh.py,--dataset $(LWDGH_DATASET_$(1)) --shots $(s) --filters $(LWDGH_FILTERS) --epochs \
	$(LWDGH_EPOCHS_$(1)) --iters-per-epoch $(LWDGH_ITERS) $(LWDGH_VARIANT_$(v)) --seed $(seed),$(call lwdgh_dir,$(1),$(v),$(s),$(seed)))))))
endef
$(foreach table,$(LWDGH_TABLES),$(eval $(call lwdgh_table,$(table))))
.PHONY: reproduce-lwdgh
reproduce-lwdgh: $(foreach table,$(LWDGH_TABLES),lwdgh-$(table))

# Paper 002's Table 1 grid scaled down to Omniglot (the omniglot-small subsets where the full zips are
# absent), 5-way 1-shot, to check the paper's qualitative claims in at most 30 minutes on 2 CPU cores: every
# method × task batch {5, 1} × OG/GS at inner lr 0.1, and MAML at 10× (1.0). Scaled down: Conv4-32, 3
# inner steps, 5 queries per class, 20 meta-iterations per epoch, 10 epochs with task batch 5 and five
# times as many with task batch 1 (as the paper's appendix A.3: the same tasks seen), 100 validation and
# 200 test tasks.
# QUICK_JOBS single-threaded runs at once (small tensors: one thread per run uses 2 cores best), then
# results/quick.md and its figures.
QUICK_JOBS ?= 2
QUICK_EPOCHS_t5 = 10
QUICK_EPOCHS_t1 = 50
QUICK_FLAGS = --dataset omniglot --ways 5 --shots 1 --queries 5 --filters 32 --inner-steps 3 --iters-per-epoch 20 \
	--val-tasks 100 --test-tasks 200 --cache-dir .cache --quiet
# (method, task batch, inner lr) cells; each has an OG and a GS run per seed.
QUICK_CELLS = $(foreach m,$(GS_METHODS),$(foreach t,$(GS_TASKS),$(m)-$(t)-0.1)) maml-t5-1.0
quick_dir = $(RUNS)/quick/$(1)_$(4)__omniglot__5w1s__$(2)__lr$(3)__$(5)
QUICK_RUNS = $(foreach c,$(QUICK_CELLS),$(foreach gs,og gs,$(foreach seed,$(SEEDS),$(call quick_dir,$(call \
	word_at,1,$(c)),$(call word_at,2,$(c)),$(call word_at,3,$(c)),$(gs),$(seed))/result.json)))
$(foreach c,$(QUICK_CELLS),$(foreach gs,og gs,$(foreach seed,$(SEEDS),$(eval $(call run_rule,$(call \
	word_at,1,$(c))_gs.py,$(QUICK_FLAGS) --tasks $(patsubst t%,%,$(call word_at,2,$(c))) \
	--epochs $(QUICK_EPOCHS_$(call word_at,2,$(c))) --inner-lr $(call word_at,3,$(c)) $(call gs_flag,$(gs)) \
	--seed $(seed),$(call quick_dir,$(call word_at,1,$(c)),$(call word_at,2,$(c)),$(call word_at,3,$(c)),$(gs),$(seed)))))))
.PHONY: reproduce-quick quick-runs
quick-runs: $(QUICK_RUNS)
reproduce-quick: setup
	OMP_NUM_THREADS=1 $(MAKE) -j $(QUICK_JOBS) quick-runs
	$(PY) tools/report.py --runs $(RUNS)/quick --name quick --only-found --title "Quick reproduction: paper 002's Table 1 grid on Omniglot, 5-way 1-shot, scaled down"

# The report: every run under RUNS but the quick grid and the demo, in the papers' layout beside the
# papers' numbers, as results/report.md and its figures in results/report/.
REPORT_EXCLUDE ?= quick demo
.PHONY: report
report: setup
	$(PY) tools/report.py --runs $(RUNS) --out results --name report --exclude $(REPORT_EXCLUDE)

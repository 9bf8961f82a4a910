# Every target sets itself up from requirements.txt into .venv on first use.
# Variables: DATA (dataset root), TEST_DATA (the real data the tests read when present), DEVICE, PYTHON.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data
TEST_DATA ?= ../shared/data
DEVICE ?= auto
# glibc's allocator keeps the memory a meta-iteration frees for the next one instead of mapping its largest
# tensors afresh each time: about 1.6x faster on a CPU at 84x84 (docs/benchmarks.md); no effect elsewhere.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615

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
DEMO_FLAGS = --dataset omniglot --data-root $(DATA) --cache-dir .cache --download --device $(DEVICE) --ways 5 \
	--shots 1 --tasks 5 --epochs 5 --iters-per-epoch 30 --val-tasks 100 --test-tasks 200 --seed 1
DATA_HINT = echo "hint: if the error above says that no Omniglot was found under DATA=$(DATA) (and none could be \
	downloaded), point DATA at a folder holding omniglot-py/ or omniglot-small/, e.g. make demo DATA=../shared/data"
demo: setup
	rm -rf runs/demo
	$(PY) maml_gs.py $(DEMO_FLAGS) --gs --out runs/demo/maml_gs || { $(DATA_HINT); exit 1; }
	$(PY) maml_gs.py $(DEMO_FLAGS) --no-gs --out runs/demo/maml
	$(PY) tools/compare.py runs/demo/maml runs/demo/maml_gs

# Speed and memory against a plain loop and higher (installed here when possible). The bench sets the
# allocator per candidate itself.
bench: setup
	$(PY) -m pip install --quiet -r requirements-bench.txt || echo "higher not installed: the bench skips it"
	env -u GLIBC_TUNABLES $(PY) tools/bench.py --device $(DEVICE)

clean-venv:
	rm -rf $(VENV)

# ---- Reproducing the papers -------------------------------------------------------------------------
# One target per paper row (or figure panel); `make -n <target>` prints its commands. Variables: DATA,
# DEVICE, SEEDS (one run per seed), RUNNER (a prefix for every run, e.g. `srun --gres=gpu:1`), RUNS (where
# the run directories go). `make -j N` runs N targets at once. A finished run (its result.json exists) is
# skipped; an interrupted one (config.json but no result.json) is resumed from its last checkpoint.
SEEDS ?= 1
RUNNER ?=
RUNS ?= runs
# $(call run,<program>,<flags>,<run directory>): one run, skipped when finished, resumed when interrupted.
run = if [ -f $(3)/result.json ]; then echo "finished, skipped: $(3)"; \
	elif [ -f $(3)/config.json ]; then $(RUNNER) $(PY) $(1) --resume $(3) --device $(DEVICE); \
	else $(RUNNER) $(PY) $(1) $(2) --data-root $(DATA) --device $(DEVICE) --out $(3); fi
# $(call seeds,<program>,<run directory without the seed>,<flags>): the run once per seed.
seeds = for seed in $(SEEDS); do $(call run,$(1),$(3) --seed $$seed,$(2)__$$seed) || exit 1; done
# $(call pair,<method>,<folder>,<run name>,<flags>): <method>_gs.py without (OG, --no-gs) and with (GS, --gs)
# gradient sharing, once per seed, into $(RUNS)/<folder>/<method>_{og,gs}__<run name>__<seed>.
pair = $(call seeds,$(1)_gs.py,$(RUNS)/$(2)/$(1)_og__$(3),$(4) --no-gs) && \
	$(call seeds,$(1)_gs.py,$(RUNS)/$(2)/$(1)_gs__$(3),$(4) --gs)

# O. Chang and H. Lipson, "Accelerating Meta-Learning by Sharing Gradients" (gradient sharing, arXiv 2312.08398),
# Table 1: 5-way 5-shot, rows method/task batch, OG and GS.
# Epochs: appendix A.3 (task batch 5: 150 on CUB, 250 on MiniImagenet; task batch 1: five times as many).
# MAML++ clamps meta-gradients to ±10 on MiniImagenet, as its reference code does, and anneals to no lower lr.
CUB_T5 = --dataset cub --ways 5 --tasks 5 --epochs 150
CUB_T1 = --dataset cub --ways 5 --tasks 1 --epochs 750
MINI_T5 = --dataset miniimagenet --ways 5 --tasks 5 --epochs 250
MINI_T1 = --dataset miniimagenet --ways 5 --tasks 1 --epochs 1250
CLIP = --clip-grad 10
PP = --min-outer-lr 0.001  # MAML++: the released MiniImagenet configs' min_learning_rate = the outer lr
PP_MINI = $(CLIP) $(PP)
TABLE1 = table1-maml-cub-t5 table1-maml-cub-t1 table1-maml-miniimagenet-t5 table1-maml-miniimagenet-t1 \
	table1-metasgd-cub-t5 table1-metasgd-cub-t1 table1-metasgd-miniimagenet-t5 table1-metasgd-miniimagenet-t1 \
	table1-mamlpp-cub-t5 table1-mamlpp-cub-t1 table1-mamlpp-miniimagenet-t5 table1-mamlpp-miniimagenet-t1
.PHONY: reproduce-table1 $(TABLE1)
reproduce-table1: $(TABLE1)
table1-maml-cub-t5: setup ; $(call pair,maml,table1,cub__5w5s__t5,$(CUB_T5) --shots 5)
table1-maml-cub-t1: setup ; $(call pair,maml,table1,cub__5w5s__t1,$(CUB_T1) --shots 5)
table1-maml-miniimagenet-t5: setup ; $(call pair,maml,table1,miniimagenet__5w5s__t5,$(MINI_T5) --shots 5)
table1-maml-miniimagenet-t1: setup ; $(call pair,maml,table1,miniimagenet__5w5s__t1,$(MINI_T1) --shots 5)
table1-metasgd-cub-t5: setup ; $(call pair,metasgd,table1,cub__5w5s__t5,$(CUB_T5) --shots 5)
table1-metasgd-cub-t1: setup ; $(call pair,metasgd,table1,cub__5w5s__t1,$(CUB_T1) --shots 5)
table1-metasgd-miniimagenet-t5: setup ; $(call pair,metasgd,table1,miniimagenet__5w5s__t5,$(MINI_T5) --shots 5)
table1-metasgd-miniimagenet-t1: setup ; $(call pair,metasgd,table1,miniimagenet__5w5s__t1,$(MINI_T1) --shots 5)
table1-mamlpp-cub-t5: setup ; $(call pair,mamlpp,table1,cub__5w5s__t5,$(CUB_T5) --shots 5 $(PP))
table1-mamlpp-cub-t1: setup ; $(call pair,mamlpp,table1,cub__5w5s__t1,$(CUB_T1) --shots 5 $(PP))
table1-mamlpp-miniimagenet-t5: setup ; $(call pair,mamlpp,table1,miniimagenet__5w5s__t5,$(MINI_T5) --shots 5 $(PP_MINI))
table1-mamlpp-miniimagenet-t1: setup ; $(call pair,mamlpp,table1,miniimagenet__5w5s__t1,$(MINI_T1) --shots 5 $(PP_MINI))

# The --gs-source ablation at Table 1's full protocol (task batch 5; a GPU's work): each row's OG and GS runs (the
# same runs as reproduce-table1's) and GS with the batch's g_k alone and with the earlier batches' mean alone.
ABLATION_TABLE1 = ablation-maml-cub ablation-maml-miniimagenet ablation-metasgd-cub ablation-metasgd-miniimagenet \
	ablation-mamlpp-cub ablation-mamlpp-miniimagenet
.PHONY: reproduce-gs-ablation $(ABLATION_TABLE1)
reproduce-gs-ablation: $(ABLATION_TABLE1)
ablation-maml-cub: setup ; $(call sources,maml,table1,cub__5w5s__t5,$(CUB_T5) --shots 5)
ablation-maml-miniimagenet: setup ; $(call sources,maml,table1,miniimagenet__5w5s__t5,$(MINI_T5) --shots 5)
ablation-metasgd-cub: setup ; $(call sources,metasgd,table1,cub__5w5s__t5,$(CUB_T5) --shots 5)
ablation-metasgd-miniimagenet: setup ; $(call sources,metasgd,table1,miniimagenet__5w5s__t5,$(MINI_T5) --shots 5)
ablation-mamlpp-cub: setup ; $(call sources,mamlpp,table1,cub__5w5s__t5,$(CUB_T5) --shots 5 $(PP))
ablation-mamlpp-miniimagenet: setup
	$(call sources,mamlpp,table1,miniimagenet__5w5s__t5,$(MINI_T5) --shots 5 $(PP_MINI))

# Chang & Lipson (arXiv 2312.08398), Figures 4-11 (appendix C): meta-validation curves (4, 6, 8, 10) and σ(m), σ(λ)
# (5, 7, 9, 11) of every panel: method × {1, 5}-shot × task batch {5, 1}, OG and GS; CUB (Figures 4, 5, 8, 9),
# MiniImagenet (6, 7, 10, 11); inner lr 0.1 (4-7) and 1.0 (8-11). The 5-shot panels at inner lr 0.1 are Table 1's
# runs.
FIGURES = figures-cub-lr0.1 figures-miniimagenet-lr0.1 figures-cub-lr1.0 figures-miniimagenet-lr1.0
.PHONY: reproduce-figures $(FIGURES)
reproduce-figures: $(FIGURES)
# $(call figures,<dataset>,<shots>,<inner lr>): every method × those shots × task batch {5, 1}, OG and GS.
T5_cub = $(CUB_T5)
T1_cub = $(CUB_T1)
T5_miniimagenet = $(MINI_T5)
T1_miniimagenet = $(MINI_T1)
PP_cub = $(PP)
PP_miniimagenet = $(PP_MINI)
figure = $(call pair,$(1),figures,$(2)__5w$(3)s__t$(4)__lr$(5),$(T$(4)_$(2)) --shots $(3) --inner-lr $(5) \
	$(if $(filter mamlpp,$(1)),$(PP_$(2))))
figures = $(foreach method,maml metasgd mamlpp,$(foreach shots,$(2),$(foreach t,5 1,\
	$(call figure,$(method),$(1),$(shots),$(t),$(3)) &&))) true
figures-cub-lr0.1: $(filter %-cub-t5 %-cub-t1,$(TABLE1)) setup ; $(call figures,cub,1,0.1)
figures-miniimagenet-lr0.1: $(filter %-miniimagenet-t5 %-miniimagenet-t1,$(TABLE1)) setup
	$(call figures,miniimagenet,1,0.1)
figures-cub-lr1.0: setup ; $(call figures,cub,1 5,1.0)
figures-miniimagenet-lr1.0: setup ; $(call figures,miniimagenet,1 5,1.0)

# "Cooperative Meta-Learning with Gradient Augmentation" (CML, arXiv 2406.04639; code JJongyn/CML), 5-way 1- and
# 5-shot: each base alone (--gamma 0) and with the co-learner, on the image data sets the paper names
# (MiniImagenet, Omniglot, CIFAR-FS, FC100, VGG Flower). The commands of cml.py's docstring: MAML and BOIL with
# the reference's settings (task batch 4, one inner step of 0.5, 64 filters, 300 x 100 meta-iterations), MAML++
# with mamlpp_gs.py's defaults and task batch 2, Sharp-MAML (SAM in both loops, radii 0.0005) with its authors'
# MiniImagenet command (mominabbass/Sharp-MAML, both/README.md: task batch 4, 5 inner steps of 0.1, 64 filters,
# 600 x 100 meta-iterations).
CML_DIR = $(RUNS)/cml/
CML_REF = --tasks 4 --inner-steps 1 --inner-lr 0.5 --filters 64 --epochs 300 --iters-per-epoch 100
CML_MAMLPP = --tasks 2 --epochs 250 --clip-grad 10
CML_SHARP = --tasks 4 --inner-steps 5 --inner-lr 0.1 --filters 64 --epochs 600 --iters-per-epoch 100
# $(call cml,<base>,<dataset>,<shots>,<flags>): the base alone and the base + CML, each once per seed.
cml = $(call seeds,cml.py,$(CML_DIR)$(1)__$(2)__5w$(3)s,--base $(1) --dataset $(2) --shots $(3) --gamma 0 $(4)) && \
	$(call seeds,cml.py,$(CML_DIR)cml_$(1)__$(2)__5w$(3)s,--base $(1) --dataset $(2) --shots $(3) $(4))
CML = cml-miniimagenet cml-omniglot cml-cifarfs cml-fc100 cml-vggflower
.PHONY: reproduce-cml $(CML)
reproduce-cml: $(CML)
CML_FLAGS_maml = $(CML_REF)
CML_FLAGS_mamlpp = $(CML_MAMLPP)
CML_FLAGS_boil = $(CML_REF)
CML_FLAGS_sharpmaml = $(CML_SHARP)
$(CML): cml-%: setup  # cml-<dataset>: each base × 1- and 5-shot
	$(foreach base,maml mamlpp boil sharpmaml,$(foreach shots,1 5,$(call cml,$(base),$*,$(shots),\
		$(CML_FLAGS_$(base))) &&)) true

# "Cross-Task Gradient Harmonization for Meta-Learning" (LWDGH; anonymous, under double-blind review, no arXiv id;
# code built on fmu2/PyTorch-MAML): the commands of lwdgh.py's docstring, MAML (--p-min 1 --p-max 1: always explore,
# plain MAML with the GCI logged), LWDGH alone (--no-ee) and LWDGH+EE. 5-way, 300 epochs of 200 meta-iterations
# (fmu2's configs: the paper gives none) in Table 1 (MiniImagenet), Table 2 (tieredImageNet; Convnet4 is fmu2's tiered
# configs' wide-convnet4, 64 filters; ResNet-12 1-shot), Table 3 (MiniImagenet, ResNet-12) and Table 4 (CUB); Table 5,
# the ablation, and Table 6, the transition epoch (20/33/50% of the epochs, fixed or cosine), 20 epochs, 1-shot: Table
# 6's 33%-cosine row is Table 5's LWDGH+EE run (the paper prints 51.33 for both), run once. Meta-test queries per
# class as fmu2's test configs: 1 at 1-shot, 5 at 5-shot (lwdgh.py's docstring).
LW_ITERS = --iters-per-epoch 200
LW = --filters 32 $(LW_ITERS)
LW_MINI = $(LW) --dataset miniimagenet
LW_TIERED = --dataset tieredimagenet $(LW_ITERS)
RESNET = --backbone resnet12 $(LW_ITERS)
LW_DIR = $(RUNS)/lwdgh/
MAML = --p-min 1 --p-max 1
Q1 = --test-queries 1
Q5 = --test-queries 5
LWDGH = lwdgh-table1 lwdgh-table2 lwdgh-table3 lwdgh-table4 lwdgh-table5 lwdgh-table6
.PHONY: reproduce-lwdgh $(LWDGH) lwdgh-ee-20ep
reproduce-lwdgh: $(LWDGH)
lwdgh-table1: setup
	$(call seeds,lwdgh.py,$(LW_DIR)table1_maml__miniimagenet__5w1s,$(LW_MINI) --shots 1 --epochs 300 $(MAML) $(Q1))
	$(call seeds,lwdgh.py,$(LW_DIR)table1_lwdgh_ee__miniimagenet__5w1s,$(LW_MINI) --shots 1 --epochs 300 $(Q1))
	$(call seeds,lwdgh.py,$(LW_DIR)table1_maml__miniimagenet__5w5s,$(LW_MINI) --shots 5 --epochs 300 $(MAML) $(Q5))
	$(call seeds,lwdgh.py,$(LW_DIR)table1_lwdgh_ee__miniimagenet__5w5s,$(LW_MINI) --shots 5 --epochs 300 $(Q5))
lwdgh-table2: setup
	$(call seeds,lwdgh.py,$(LW_DIR)table2_maml__tieredimagenet__5w1s,$(LW_TIERED) --filters 64 --shots 1 --epochs 300 \
		$(MAML) $(Q1))
	$(call seeds,lwdgh.py,$(LW_DIR)table2_lwdgh_ee__tieredimagenet__5w1s,$(LW_TIERED) --filters 64 --shots 1 \
		--epochs 300 $(Q1))
	$(call seeds,lwdgh.py,$(LW_DIR)table2_maml_resnet12__tieredimagenet__5w1s,$(LW_TIERED) $(RESNET) --shots 1 \
		--epochs 300 $(MAML) $(Q1))
	$(call seeds,lwdgh.py,$(LW_DIR)table2_lwdgh_ee_resnet12__tieredimagenet__5w1s,$(LW_TIERED) $(RESNET) --shots 1 \
		--epochs 300 $(Q1))
	$(call seeds,lwdgh.py,$(LW_DIR)table2_maml__tieredimagenet__5w5s,$(LW_TIERED) --filters 64 --shots 5 --epochs 300 \
		$(MAML) $(Q5))
	$(call seeds,lwdgh.py,$(LW_DIR)table2_lwdgh_ee__tieredimagenet__5w5s,$(LW_TIERED) --filters 64 --shots 5 \
		--epochs 300 $(Q5))
lwdgh-table3: setup
	$(call seeds,lwdgh.py,$(LW_DIR)table3_maml_resnet12__miniimagenet__5w1s,--dataset miniimagenet $(RESNET) --shots 1 \
		--epochs 300 $(MAML) $(Q1))
	$(call seeds,lwdgh.py,$(LW_DIR)table3_lwdgh_ee_resnet12__miniimagenet__5w1s,--dataset miniimagenet $(RESNET) \
		--shots 1 --epochs 300 $(Q1))
lwdgh-table4: setup
	$(call seeds,lwdgh.py,$(LW_DIR)table4_maml__cub__5w1s,$(LW) --dataset cub --shots 1 --epochs 300 $(MAML) $(Q1))
	$(call seeds,lwdgh.py,$(LW_DIR)table4_lwdgh_ee__cub__5w1s,$(LW) --dataset cub --shots 1 --epochs 300 $(Q1))
	$(call seeds,lwdgh.py,$(LW_DIR)table4_maml__cub__5w5s,$(LW) --dataset cub --shots 5 --epochs 300 $(MAML) $(Q5))
	$(call seeds,lwdgh.py,$(LW_DIR)table4_lwdgh_ee__cub__5w5s,$(LW) --dataset cub --shots 5 --epochs 300 $(Q5))
lwdgh-ee-20ep: setup
	$(call seeds,lwdgh.py,$(LW_DIR)table5_lwdgh_ee__miniimagenet__5w1s,$(LW_MINI) --shots 1 --epochs 20 $(Q1))
lwdgh-table5: lwdgh-ee-20ep
	$(call seeds,lwdgh.py,$(LW_DIR)table5_maml__miniimagenet__5w1s,$(LW_MINI) --shots 1 --epochs 20 $(MAML) $(Q1))
	$(call seeds,lwdgh.py,$(LW_DIR)table5_lwdgh__miniimagenet__5w1s,$(LW_MINI) --shots 1 --epochs 20 --no-ee $(Q1))
T6 = $(LW_MINI) --shots 1 --epochs 20 $(Q1)
lwdgh-table6: lwdgh-ee-20ep
	$(call seeds,lwdgh.py,$(LW_DIR)table6_lwdgh_ee_e20fixed__miniimagenet__5w1s,$(T6) --transition 0.2 --schedule fixed)
	$(call seeds,lwdgh.py,$(LW_DIR)table6_lwdgh_ee_e20cosine__miniimagenet__5w1s,$(T6) --transition 0.2 --schedule cosine)
	$(call seeds,lwdgh.py,$(LW_DIR)table6_lwdgh_ee_e33fixed__miniimagenet__5w1s,$(T6) --transition 0.33 --schedule fixed)
	$(call seeds,lwdgh.py,$(LW_DIR)table6_lwdgh_ee_e50fixed__miniimagenet__5w1s,$(T6) --transition 0.5 --schedule fixed)
	$(call seeds,lwdgh.py,$(LW_DIR)table6_lwdgh_ee_e50cosine__miniimagenet__5w1s,$(T6) --transition 0.5 --schedule cosine)

# Full Omniglot (torchvision's layout under DATA, e.g. DATA=../shared/data/omniglot-full), the MAML++ reference's
# released configs (AntreasAntoniou/HowToTrainYourMAMLPytorch, experiment_config/omniglot_maml++-omniglot_
# <shots>_8_0.1_64_<ways>_<seed>.json): task batch 8, 5 inner steps at 0.1, 64 filters, max-pooling, second
# order, 1 target image per class, 100 epochs x 500 meta-iterations, top-5 ensemble on 600 tasks; MAML++'s own
# settings (MSL for 10 epochs, cosine outer lr to 1e-5) in its rows. MAML, Meta-SGD and MAML++, OG and GS, 5- and
# 20-way, 1- and 5-shot. Our split is Vinyals' (1,028 / 172 / 423 characters x 4 rotations); the reference draws
# its own (70.9 / 3.1 / 26.1% of the characters).
OMNI = --dataset omniglot --tasks 8 --inner-steps 5 --inner-lr 0.1 --filters 64 --queries 1 --epochs 100 \
	--iters-per-epoch 500 --val-tasks 600 --test-tasks 600
OMNI_MAMLPP = $(OMNI) --msl-epochs 10 --min-outer-lr 0.00001
OMNIGLOT = omniglot-maml omniglot-metasgd omniglot-mamlpp
.PHONY: reproduce-omniglot $(OMNIGLOT) omniglot-check
reproduce-omniglot: $(OMNIGLOT)
OMNI_FLAGS_maml = $(OMNI)
OMNI_FLAGS_metasgd = $(OMNI)
OMNI_FLAGS_mamlpp = $(OMNI_MAMLPP)
$(OMNIGLOT): omniglot-%: setup  # omniglot-<method>: 5- and 20-way × 1- and 5-shot, OG and GS
	$(foreach ways,5 20,$(foreach shots,1 5,$(call pair,$*,omniglot,omniglot__$(ways)w$(shots)s__t8,\
		$(OMNI_FLAGS_$*) --ways $(ways) --shots $(shots)) &&)) true

# The CPU check and the gradient-sharing study, sized for the 2-core development machine (results/omniglot.md):
# each single-threaded, so that the two run side by side (make -j 2 omniglot-study). The check: MAML (--no-gs),
# 5-way 1-shot, the protocol above cut to CHECK_EPOCHS (18) x 250 meta-iterations. The study: MAML OG and GS, task
# batch 5 and 1 (five times the meta-iterations: the same tasks seen), STUDY_SEEDS seeds, each pair on the same
# tasks; smaller than the check per run (32 filters, 3 inner steps, 5 queries) so that the seeds fit.
CHECK_EPOCHS ?= 18
CHECK = --dataset omniglot --ways 5 --shots 1 --no-gs --tasks 8 --inner-steps 5 --inner-lr 0.1 --filters 64 \
	--queries 1 --epochs $(CHECK_EPOCHS) --iters-per-epoch 250 --val-tasks 200 --test-tasks 600 --cache-dir .cache --quiet
STUDY_SEEDS ?= 1 2 3 4 5
STUDY = --dataset omniglot --ways 5 --shots 1 --queries 5 --filters 32 --inner-steps 3 --inner-lr 0.1 --epochs 15 \
	--val-tasks 200 --test-tasks 600 --cache-dir .cache --quiet
.PHONY: omniglot-study gs-study gs-study-t5 gs-study-t1 omniglot-report
omniglot-check: setup
	export OMP_NUM_THREADS=1; $(call run,maml_gs.py,$(CHECK) --seed 1,$(RUNS)/omniglot-check/maml__omniglot__5w1s__t8__1)
gs-study: setup
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory SEEDS="$(STUDY_SEEDS)" gs-study-t5 gs-study-t1
gs-study-t5: setup ; $(call pair,maml,gs-study,omniglot__5w1s__t5,$(STUDY) --tasks 5 --iters-per-epoch 30)
gs-study-t1: setup ; $(call pair,maml,gs-study,omniglot__5w1s__t1,$(STUDY) --tasks 1 --iters-per-epoch 150)
# The gradient-sharing ablation (--gs-source): where GS's help comes from, with the gs-study's network and task
# shape and ABLATION_SEEDS paired seeds. At task batch 5, OG against GS sharing both (the paper), the batch's g_k alone
# and the earlier batches' mean alone; then OG against GS at task batches 1, 10 and 20, all with the same 300
# meta-iterations (15 epochs x 20), so that a run sees 300 x T tasks. Sized to fit 2 cores: 100 validation tasks per
# epoch, and the longest targets first so that make -j 2 keeps both busy. One thread per run:
# make -j 2 gs-ablation DATA=<full Omniglot>.
ABLATION_SEEDS ?= 1 2 3 4 5
ABLATION = --dataset omniglot --ways 5 --shots 1 --queries 5 --filters 32 --inner-steps 3 --inner-lr 0.1 --epochs 15 \
	--iters-per-epoch 20 --val-tasks 100 --test-tasks 600 --cache-dir .cache --quiet
# $(call sources,<method>,<folder>,<run name>,<flags>): pair, then GS with --gs-source batch and history
sources = $(call pair,$(1),$(2),$(3),$(4)) && \
	$(call seeds,$(1)_gs.py,$(RUNS)/$(2)/$(1)_gs_batch__$(3),$(4) --gs --gs-source batch) && \
	$(call seeds,$(1)_gs.py,$(RUNS)/$(2)/$(1)_gs_history__$(3),$(4) --gs --gs-source history)
GS_ABLATION = gs-ablation-t20 gs-ablation-sources gs-ablation-t10 gs-ablation-t1
.PHONY: gs-ablation $(GS_ABLATION)
gs-ablation: setup  # the runs, then results/gs_ablation.md
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory SEEDS="$(ABLATION_SEEDS)" $(GS_ABLATION)
	$(PY) tools/gs_ablation_report.py --runs $(RUNS)/gs-ablation --out results
gs-ablation-sources: setup ; $(call sources,maml,gs-ablation,omniglot__5w1s__t5,$(ABLATION) --tasks 5)
$(filter-out gs-ablation-sources,$(GS_ABLATION)): gs-ablation-t%: setup
	$(call pair,maml,gs-ablation,omniglot__5w1s__t$*,$(ABLATION) --tasks $*)

omniglot-study: omniglot-check gs-study
	$(MAKE) --no-print-directory omniglot-report
omniglot-report: setup
	$(PY) tools/omniglot_report.py --check $(RUNS)/omniglot-check/maml__omniglot__5w1s__t8__1 \
		--study $(RUNS)/gs-study --out results

# Chang & Lipson's (arXiv 2312.08398) Table 1 grid scaled down to Omniglot (the omniglot-small subsets where the full
# zips are absent), 5-way 1-shot, to check the paper's qualitative claims in about 30 minutes on 2 CPU cores: every
# method × task batch {5, 1} × OG/GS at inner lr 0.1, and MAML at 10× (1.0). Conv4-32, 3 inner steps, 5 queries per
# class, 20 meta-iterations per epoch, 10 epochs with task batch 5 and five times as many with task batch 1 (as
# appendix A.3: the same tasks seen), 100 validation and 200 test tasks. QUICK_JOBS single-threaded rows at once
# (small tensors: one thread per run uses 2 cores best), then results/quick.md and its figures.
QUICK_JOBS ?= 2
Q = --dataset omniglot --ways 5 --shots 1 --queries 5 --filters 32 --inner-steps 3 --iters-per-epoch 20 \
	--val-tasks 100 --test-tasks 200 --cache-dir .cache --quiet
QUICK = quick-maml-t5 quick-maml-t1 quick-metasgd-t5 quick-metasgd-t1 quick-mamlpp-t5 quick-mamlpp-t1 \
	quick-maml-t5-lr1.0
.PHONY: reproduce-quick $(QUICK)
quick-maml-t5: setup ; $(call pair,maml,quick,omniglot__5w1s__t5__lr0.1,$(Q) --tasks 5 --epochs 10 --inner-lr 0.1)
quick-maml-t1: setup ; $(call pair,maml,quick,omniglot__5w1s__t1__lr0.1,$(Q) --tasks 1 --epochs 50 --inner-lr 0.1)
quick-metasgd-t5: setup ; $(call pair,metasgd,quick,omniglot__5w1s__t5__lr0.1,$(Q) --tasks 5 --epochs 10 --inner-lr 0.1)
quick-metasgd-t1: setup ; $(call pair,metasgd,quick,omniglot__5w1s__t1__lr0.1,$(Q) --tasks 1 --epochs 50 --inner-lr 0.1)
quick-mamlpp-t5: setup ; $(call pair,mamlpp,quick,omniglot__5w1s__t5__lr0.1,$(Q) --tasks 5 --epochs 10 --inner-lr 0.1)
quick-mamlpp-t1: setup ; $(call pair,mamlpp,quick,omniglot__5w1s__t1__lr0.1,$(Q) --tasks 1 --epochs 50 --inner-lr 0.1)
quick-maml-t5-lr1.0: setup ; $(call pair,maml,quick,omniglot__5w1s__t5__lr1.0,$(Q) --tasks 5 --epochs 10 --inner-lr 1.0)
reproduce-quick: setup
	OMP_NUM_THREADS=1 $(MAKE) -j $(QUICK_JOBS) $(QUICK)
	$(PY) tools/report.py --runs $(RUNS)/quick --name quick --only-found \
		--title "Quick reproduction: Chang & Lipson's (arXiv 2312.08398) Table 1 grid on Omniglot, 5-way 1-shot, scaled down"

# Few-shot sinusoid regression (--dataset sinusoid), a published table that a CPU reproduces in full. The protocol
# of C. Finn et al. (arXiv 1703.03400), Section 5.1, and of its code (cbfinn/maml, main.py's sinusoid command and
# defaults): the 1-40-40-1 ReLU MLP, one inner step of alpha = 0.01 (the paper's; the code's default is 0.001),
# K support and K other query points per task, 25 tasks per meta-iteration, Adam at 0.001, 70,000 meta-iterations
# (70 epochs x 1000), 600 test tasks. Each row trained and tested at its own K in SINUSOID_SHOTS: MAML and Meta-SGD
# without (OG) and with gradient sharing (GS), and MAML + CML (cml.py, gamma 1; its gamma 0 is MAML).
# SINUSOID_SEEDS seeds, one thread per run, SINUSOID_JOBS at once; then results/sinusoid.md
# (tools/sinusoid_report.py) and its figure.
SINUSOID_SEEDS ?= 1
SINUSOID_SHOTS ?= 5 10 20
SINUSOID_JOBS ?= 2
SINUSOID = --dataset sinusoid --inner-steps 1 --inner-lr 0.01 --tasks 25 --outer-lr 0.001 --epochs 70 \
	--iters-per-epoch 1000 --val-tasks 100 --test-tasks 600 --quiet
SINUSOID_ROWS = $(foreach k,$(SINUSOID_SHOTS),sinusoid-maml-k$(k) sinusoid-metasgd-k$(k) sinusoid-cml-k$(k))
.PHONY: reproduce-sinusoid $(SINUSOID_ROWS)
$(filter sinusoid-maml-% sinusoid-metasgd-%,$(SINUSOID_ROWS)): sinusoid-%: setup
	$(call pair,$(firstword $(subst -, ,$*)),sinusoid,sinusoid__$(lastword $(subst -, ,$*)),$(SINUSOID) \
		--shots $(subst k,,$(lastword $(subst -, ,$*))) --queries $(subst k,,$(lastword $(subst -, ,$*))))
$(filter sinusoid-cml-%,$(SINUSOID_ROWS)): sinusoid-cml-k%: setup
	$(call seeds,cml.py,$(RUNS)/sinusoid/cml_maml__sinusoid__k$*,$(SINUSOID) --base maml --gamma 1 --shots $* \
		--queries $*)
reproduce-sinusoid: setup
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j $(SINUSOID_JOBS) SEEDS="$(SINUSOID_SEEDS)" $(SINUSOID_ROWS)
	$(PY) tools/sinusoid_report.py --runs $(RUNS)/sinusoid --out results

# The report: every run under RUNS but the quick grid and the demo, in the papers' layout beside the
# papers' numbers, as results/report.md and its figures in results/report/.
REPORT_EXCLUDE ?= quick demo gs-study omniglot-check gs-ablation sinusoid
.PHONY: report
report: setup
	$(PY) tools/report.py --runs $(RUNS) --out results --name report --exclude $(REPORT_EXCLUDE)

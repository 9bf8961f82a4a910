"""The Makefile's reproduction targets: `make -n` lists the runs of each paper table (count, flags, run
directories); finished runs are skipped, interrupted ones resumed; `make report`."""
import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import lwdgh

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
EPOCHS = {("cub", 5): 150, ("cub", 1): 750, ("miniimagenet", 5): 250, ("miniimagenet", 1): 1250}


def planned_runs(*targets: str, **variables: str) -> list[str]:
    """The command of each run the targets start. make runs them with RUNNER=echo (nothing trains), so each run
    prints its command line; finished runs print "finished, skipped: ..." instead."""
    runner = variables.pop("RUNNER", "")
    variables = {"PY": "python", "RUNS": "runs", "RUNNER": f"echo {runner}".strip(), **variables}
    out = subprocess.run(["make", "-s", "-o", "setup", *targets, *(f"{k}={v}" for k, v in variables.items())],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if not line.startswith("finished, skipped")]


def test_table1_is_every_method_dataset_and_task_batch_with_and_without_sharing():
    runs = planned_runs("reproduce-table1", DATA="/data", DEVICE="cuda", RUNNER="srun")
    assert len(runs) == 3 * 2 * 2 * 2
    seen = set()
    for command in runs:
        method = re.search(r"(\w+)_gs\.py", command).group(1)
        dataset = re.search(r"--dataset (\S+)", command).group(1)
        tasks = int(re.search(r"--tasks (\d+)", command).group(1))
        gs = "--gs" in command.split()
        assert command.startswith("srun ") and "--data-root /data --device cuda" in command
        assert "--ways 5" in command and "--shots 5" in command and f"--epochs {EPOCHS[dataset, tasks]}" in command
        assert ("--clip-grad 10" in command) == (method == "mamlpp" and dataset == "miniimagenet")
        assert ("--min-outer-lr 0.001" in command) == (method == "mamlpp")  # the reference's configs: no decay
        assert ("--no-gs" in command.split()) != gs
        seen.add((method, dataset, tasks, gs))
    assert len(seen) == len(runs)


def test_seeds_multiply_the_runs_and_name_their_directories():
    runs = planned_runs("table1-maml-cub-t5", SEEDS="1 2 3")
    assert len(runs) == 2 * 3
    assert {re.search(r"--out (\S+)", c).group(1) for c in runs} == {
        f"runs/table1/maml_{gs}__cub__5w5s__t5__{seed}" for gs in ("og", "gs") for seed in (1, 2, 3)}


FIGURE_GRID = 3 * 2 * 2 * 2 * 2 * 2  # method × dataset × shots {1, 5} × task batch {5, 1} × inner lr {0.1, 1.0} × OG/GS
DEFAULT_INNER_LR = 0.1


def flag(command: str, name: str) -> str | None:
    """The value after `name` in a command, or None when the flag is absent."""
    found = re.search(rf"{name} (\S+)", command)
    return found.group(1) if found else None


def out_dir(command: str) -> str:
    return flag(command, "--out")


def test_figures_are_the_full_grid_of_figures_4_to_11_and_reuse_table1():
    runs = planned_runs("reproduce-figures", DATA="/data", DEVICE="cuda", RUNNER="srun")
    assert len(runs) == FIGURE_GRID
    table1 = planned_runs("reproduce-table1", DATA="/data", DEVICE="cuda", RUNNER="srun")
    assert set(table1) <= set(runs)  # Table 1's runs are the 5-shot, inner lr 0.1 panels: the same commands
    seen = set()
    for command in runs:
        method = re.search(r"(\w+)_gs\.py", command).group(1)
        dataset, shots, tasks = flag(command, "--dataset"), int(flag(command, "--shots")), int(flag(command, "--tasks"))
        lr = float(flag(command, "--inner-lr") or DEFAULT_INNER_LR)
        side = "og" if "--no-gs" in command.split() else "gs"
        assert command.startswith("srun ") and "--data-root /data --device cuda" in command and "--ways 5" in command
        assert f"--epochs {EPOCHS[dataset, tasks]}" in command  # appendix A.3, the same for 1 and 5 shots
        assert ("--clip-grad 10" in command) == (method == "mamlpp" and dataset == "miniimagenet")
        if shots == 5 and lr == DEFAULT_INNER_LR:
            assert command in table1
            assert out_dir(command) == f"runs/table1/{method}_{side}__{dataset}__5w5s__t{tasks}__1"
        else:
            assert out_dir(command) == f"runs/figures/{method}_{side}__{dataset}__5w{shots}s__t{tasks}__lr{lr}__1"
        seen.add((method, dataset, shots, tasks, lr, side))
    assert len(seen) == FIGURE_GRID
    assert {s[4] for s in seen} == {0.1, 1.0} and {s[2] for s in seen} == {1, 5}
    # Both targets together: each run once.
    assert len(planned_runs("reproduce-table1", "reproduce-figures")) == FIGURE_GRID


def test_figure_panels_and_figure_groups():
    group = planned_runs("figures-cub-lr1.0", SEEDS="1 2")  # Figures 8 and 9
    assert {out_dir(c) for c in group} >= {
        f"runs/figures/metasgd_{side}__cub__5w1s__t1__lr1.0__{seed}" for side in ("og", "gs") for seed in (1, 2)}
    assert len(group) == 2 * FIGURE_GRID // 4 and all("--inner-lr 1.0" in c for c in group)
    group = planned_runs("figures-miniimagenet-lr1.0")  # Figures 10 and 11
    assert len(group) == FIGURE_GRID // 4
    assert all("--dataset miniimagenet" in c and "--inner-lr 1.0" in c for c in group)


def docstring_commands(program: str) -> list[str]:
    """The flags of every `python <program> ...` line of the program's module docstring."""
    doc = ast.get_docstring(ast.parse((REPO / program).read_text()))
    return re.findall(rf"^\s*python {re.escape(program)} (.+?)\s*$", doc, flags=re.M)


def make_flags(command: str, program: str) -> tuple[str, str]:
    """(the flags before --seed, the seed) of a planned run of `program`."""
    found = re.search(rf"{re.escape(program)} (.+?) --seed (\d+) --data-root", command)
    assert found, command
    return found.group(1), found.group(2)


def assert_documented(program: str, runs: list[str]) -> None:
    """Each `python <program> ...` example of the docstring is one of the runs (its flag-value pairs, in any order)."""
    documented = docstring_commands(program)
    assert documented
    def pairs(flags: str) -> set[str]:
        return set(re.findall(r"--[\w-]+(?: [^-\s]\S*)?", flags))
    for example in documented:
        assert any(pairs(example) <= pairs(make_flags(c, program)[0]) for c in runs), example


def test_cml_runs_the_commands_of_its_docstring():
    runs = planned_runs("reproduce-cml", DATA="/data", DEVICE="cuda", RUNNER="srun")
    datasets = ("miniimagenet", "omniglot", "cifarfs", "fc100", "vggflower")
    assert len(runs) == len(datasets) * 4 * 2 * 2  # × bases maml, mamlpp, boil, sharpmaml × 1/5-shot × alone/+CML
    assert_documented("cml.py", runs)
    seen = set()
    for command in runs:
        base, shots, dataset = flag(command, "--base"), flag(command, "--shots"), flag(command, "--dataset")
        alone = flag(command, "--gamma") == "0"
        assert command.startswith("srun ") and base in ("maml", "mamlpp", "boil", "sharpmaml") and dataset in datasets
        assert out_dir(command) == f"runs/cml/{'' if alone else 'cml_'}{base}__{dataset}__5w{shots}s__1"
        assert flag(command, "--tasks") == ("2" if base == "mamlpp" else "4")  # run_cml.sh's 4; MAML++: ours, 2
        if base == "sharpmaml":  # the Sharp-MAML authors' MiniImagenet command: 5 steps of 0.1, 600 × 100; radii:
            # the defaults
            assert (flag(command, "--inner-steps"), flag(command, "--inner-lr"), flag(command, "--filters"),
                    flag(command, "--epochs"), flag(command, "--iters-per-epoch")) == ("5", "0.1", "64", "600", "100")
            assert flag(command, "--sam-inner") is None and flag(command, "--sam-outer") is None
        elif base != "mamlpp":  # the reference's run_cml.sh: one inner step of 0.5, 64 filters, 300 × 100
            assert (flag(command, "--inner-steps"), flag(command, "--inner-lr"), flag(command, "--filters")) == (
                "1", "0.5", "64") and (flag(command, "--epochs"), flag(command, "--iters-per-epoch")) == ("300", "100")
        seen.add((base, dataset, shots, alone))
    assert len(seen) == len(runs)
    assert len(planned_runs("reproduce-cml", SEEDS="1 2 3")) == len(runs) * 3
    assert len(planned_runs("cml-vggflower")) == 16


LWDGH_VARIANTS = {"maml": "--p-min 1 --p-max 1", "lwdgh": "--no-ee", "lwdgh_ee": None}


def test_lwdgh_runs_the_commands_of_its_docstring():
    runs = planned_runs("reproduce-lwdgh", DATA="/data", DEVICE="cuda", RUNNER="srun")
    # Tables 1, 4: MAML, +LWDGH+EE × 1/5-shot; Table 2: those on Convnet4 and 1-shot on ResNet-12; Table 3: 1-shot
    # on ResNet-12; Table 5: three variants; Table 6: six transitions, one of them Table 5's LWDGH+EE run (once).
    assert len(runs) == 4 + (4 + 2) + 2 + 4 + 3 + 5
    assert len({out_dir(command) for command in runs}) == len(runs)
    assert_documented("lwdgh.py", runs)
    tables = {"table1": ("miniimagenet", "300"), "table2": ("tieredimagenet", "300"), "table3": ("miniimagenet", "300"),
              "table4": ("cub", "300"), "table5": ("miniimagenet", "20"), "table6": ("miniimagenet", "20")}
    transitions = set()
    for command in runs:
        name = re.fullmatch(r"runs/lwdgh/(table\d)_(maml|lwdgh|lwdgh_ee)(_e\d+\w+)?(_resnet12)?__(\w+)__5w(\d)s__1",
                            out_dir(command))
        assert name is not None, out_dir(command)
        table, variant, transition, resnet, dataset, shots = name.groups()
        assert (flag(command, "--dataset"), flag(command, "--epochs")) == tables[table] and dataset == tables[table][0]
        assert flag(command, "--shots") == shots and flag(command, "--iters-per-epoch") == "200"
        assert flag(command, "--test-queries") == ("1" if shots == "1" else "5")  # fmu2's test configs
        assert (flag(command, "--backbone") == "resnet12") == bool(resnet)
        assert bool(resnet) >= (table == "table3") and (not resnet or table in ("table2", "table3"))
        if not resnet:  # Convnet4: the paper's 32 filters; tieredImageNet: fmu2's wide-convnet4 (64)
            assert flag(command, "--filters") == ("64" if table == "table2" else "32")
        for other, flags in LWDGH_VARIANTS.items():
            if flags:
                assert (flags in command) == (other == variant)
        if transition:
            assert table == "table6" and variant == "lwdgh_ee"
            transitions.add((flag(command, "--transition"), flag(command, "--schedule")))
            assert transition == f"_e{round(100 * float(flag(command, '--transition')))}{flag(command, '--schedule')}"
    # Table 6: 20/33/50% × fixed/cosine; 33% cosine (the defaults) is Table 5's run
    assert transitions == {(t, s) for t in ("0.2", "0.33", "0.5") for s in ("fixed", "cosine")} - {("0.33", "cosine")}
    assert lwdgh.Args().transition == 0.33 and lwdgh.Args().schedule == "cosine"
    assert len(planned_runs("lwdgh-table5")) == 3 and len(planned_runs("lwdgh-table1")) == 4
    assert len(planned_runs("lwdgh-table6")) == 6 and len(planned_runs("lwdgh-table2")) == 6
    assert len(planned_runs("lwdgh-table5", "lwdgh-table6")) == 3 + 5


def test_full_omniglot_runs_the_mamlpp_reference_configs():
    """reproduce-omniglot: experiment_config/omniglot_maml++-omniglot_<shots>_8_0.1_64_<ways>_<seed>.json of the
    MAML++ reference (task batch 8, 5 steps at 0.1, 64 filters, 1 target per class, 100 x 500, 600 test tasks)."""
    runs = planned_runs("reproduce-omniglot", DATA="/data/omniglot-full")
    assert len(runs) == 3 * 2 * 2 * 2  # methods × OG/GS × 5/20-way × 1/5-shot
    seen = set()
    for command in runs:
        program = command.split()[1]
        assert program in ("maml_gs.py", "metasgd_gs.py", "mamlpp_gs.py")
        assert "--data-root /data/omniglot-full" in command
        assert [flag(command, f) for f in ("--dataset", "--tasks", "--inner-steps", "--inner-lr", "--filters",
                                           "--queries", "--epochs", "--iters-per-epoch", "--test-tasks")] == [
            "omniglot", "8", "5", "0.1", "64", "1", "100", "500", "600"]
        assert ("--msl-epochs 10" in command) == (program == "mamlpp_gs.py")  # the reference's MSL epochs
        side = "gs" if " --gs " in command else "og"
        ways, shots = flag(command, "--ways"), flag(command, "--shots")
        assert out_dir(command) == f"runs/omniglot/{program[:-6]}_{side}__omniglot__{ways}w{shots}s__t8__1"
        seen.add((program, side, ways, shots))
    assert len(seen) == len(runs)


def test_omniglot_study_is_the_check_and_the_paired_seeds_then_the_report(tmp_path):
    runs = str(tmp_path / "runs")  # not the repository's runs/, which may hold this study's own runs
    check = planned_runs("omniglot-check", DATA="/d", RUNS=runs)
    assert len(check) == 1 and "--no-gs" in check[0] and flag(check[0], "--tasks") == "8"
    assert int(flag(check[0], "--epochs")) * int(flag(check[0], "--iters-per-epoch")) == 18 * 250
    study = planned_runs("gs-study", DATA="/d", RUNS=runs)
    assert len(study) == 2 * 2 * 5  # OG/GS × task batch 5/1 × seeds 1-5
    iterations = {}
    for command in study:
        tasks, seed = flag(command, "--tasks"), flag(command, "--seed")
        iterations[tasks] = int(flag(command, "--epochs")) * int(flag(command, "--iters-per-epoch"))
        side = "gs" if " --gs" in command else "og"
        assert out_dir(command) == f"{runs}/gs-study/maml_{side}__omniglot__5w1s__t{tasks}__{seed}"
        assert "--cache-dir" in command  # never a cache beside the shared data
    assert iterations["1"] == 5 * iterations["5"]  # task batch 1: five times the meta-iterations
    assert len(planned_runs("gs-study", STUDY_SEEDS="1 2 3", RUNS=runs)) == 12


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(tmp_path):
    """With RUNS in tmp_path and PY=echo, make really runs the targets (with -j): what each run would do."""
    finished = tmp_path / "cml" / "cml_maml__miniimagenet__5w1s__1"
    interrupted = tmp_path / "cml" / "cml_maml__miniimagenet__5w5s__1"
    for run_dir, name in ((finished, "result.json"), (interrupted, "config.json")):
        run_dir.mkdir(parents=True)
        (run_dir / name).write_text("{}")
    assert len(planned_runs("cml-miniimagenet", RUNS=str(tmp_path))) == 15  # the finished one is not run
    done = subprocess.run(["make", "-s", "-j", "3", "-o", "setup", "cml-miniimagenet", "cml-vggflower",
                           f"RUNS={tmp_path}", "PY=echo python"], cwd=REPO, capture_output=True, text=True, check=True)
    lines = sorted(line for line in done.stdout.splitlines() if not line.startswith("finished, skipped: "))
    assert f"finished, skipped: {finished}" in done.stdout
    assert len(lines) == 15 + 16 and not any(str(finished) in line for line in lines)
    assert f"python cml.py --resume {interrupted} --device auto" in lines
    assert sum(line.startswith("python cml.py --base mamlpp") for line in lines) == 2 * 2 * 2
    # A finished Table 1 run is skipped by reproduce-figures too (the same run directory).
    table1 = tmp_path / "table1" / "maml_og__cub__5w5s__t5__1"
    table1.mkdir(parents=True)
    (table1 / "result.json").write_text("{}")
    assert len(planned_runs("reproduce-figures", RUNS=str(tmp_path))) == FIGURE_GRID - 1


def test_report_target():
    out = subprocess.run(["make", "-n", "report"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    # The quick grid, the demo, the Omniglot study, the GS ablation and the sinusoid (results/quick.md, omniglot.md,
    # gs_ablation.md, sinusoid.md) have reports of their own.
    assert re.search(r"python tools/report\.py --runs runs --out results --name report "
                     r"--exclude quick demo gs-study omniglot-check gs-ablation sinusoid$", out, re.M)


def test_reproduce_quick_is_the_table1_grid_on_omniglot_then_its_report(tmp_path):
    """14 runs: every method × task batch {5, 1} × OG/GS at inner lr 0.1, and MAML/5 at 1.0; one thread each."""
    out = subprocess.run(["make", "-n", "reproduce-quick", "DATA=/data", "QUICK_JOBS=3", f"RUNS={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"OMP_NUM_THREADS=1 make -j 3 quick-maml-t5 .* quick-maml-t5-lr1.0", out)
    assert f"tools/report.py --runs {tmp_path}/quick --name quick --only-found" in out
    targets = re.search(r"make -j 3 (.*)", out).group(1).split()
    runs = planned_runs(*targets, DATA="/data", RUNS=str(tmp_path))
    cells = set()
    for command in runs:
        method = re.search(r"(\w+)_gs\.py", command).group(1)
        tasks, lr = int(flag(command, "--tasks")), float(flag(command, "--inner-lr"))
        gs = "--gs" in command.split()
        assert "--dataset omniglot --ways 5 --shots 1" in command and "--data-root /data" in command
        assert "--filters 32 --inner-steps 3 --iters-per-epoch 20" in command  # the scaled-down protocol
        assert int(flag(command, "--epochs")) == {5: 10, 1: 50}[tasks]  # task batch 1: five times the epochs
        lr_text = flag(command, "--inner-lr")
        side = "gs" if gs else "og"
        assert out_dir(command) == f"{tmp_path}/quick/{method}_{side}__omniglot__5w1s__t{tasks}__lr{lr_text}__1"
        cells.add((method, tasks, lr, gs))
    grid = {(m, t, DEFAULT_INNER_LR, gs) for m in ("maml", "metasgd", "mamlpp") for t in (5, 1) for gs in (False, True)}
    assert cells == grid | {("maml", 5, 1.0, gs) for gs in (False, True)} and len(runs) == len(cells)


def test_an_interrupted_run_resumes_through_make_with_its_own_data_root(tmp_path, shared_data):
    """The Makefile's resume line passes no --data-root: the run's own (here the real Omniglot subsets) is used."""
    run_dir = tmp_path / "run"
    flags = (f"--dataset omniglot --cache-dir {tmp_path / 'cache'} --filters 4 --tasks 2 --ways 3 --queries 2 "
             "--inner-steps 1 --epochs 1 --iters-per-epoch 2 --val-tasks 4 --test-tasks 4 --ensemble 1 --quiet")
    target = f"tiny: ; $(call run,maml_gs.py,{flags},{run_dir})"
    make = ["make", "-s", "-o", "setup", "--eval", target, "tiny", f"DATA={shared_data}", "DEVICE=cpu"]
    subprocess.run(make, cwd=REPO, check=True, capture_output=True, text=True)
    (run_dir / "result.json").unlink()  # as a kill after the last checkpoint leaves it
    resumed = subprocess.run(make + [f"DATA={tmp_path / 'nowhere'}"], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr  # with DATA pointing nowhere: the run's --data-root was used
    assert json.loads((run_dir / "result.json").read_text())["status"] == "finished"


def flag_pairs(flags: str) -> set[str]:
    return set(re.findall(r"--[\w-]+(?: [^-\s]\S*)?", flags))


def test_the_documented_table1_commands_are_the_targets_commands():
    """docs/reproducing.md's Table 1: each row's command is exactly (flag for flag) what its target runs."""
    rows = re.findall(r"^\| [^|]+ \| `(table1-[\w-]+)` \| `python (\w+\.py) (.+?)` \|$",
                      (REPO / "docs" / "reproducing.md").read_text(), flags=re.M)
    assert len(rows) == 12
    for target, program, flags in rows:
        (run,) = [c for c in planned_runs(target, DATA="/data") if " --gs " in c]
        assert flag_pairs(flags) == flag_pairs(make_flags(run, program)[0]), target


def test_gs_ablation_is_og_against_each_source_at_5_and_against_both_at_1_10_20_with_paired_seeds(tmp_path):
    runs = planned_runs("gs-ablation-sources", "gs-ablation-t1", "gs-ablation-t10", "gs-ablation-t20",
                        DATA="/data", SEEDS="1 2", RUNS=str(tmp_path / "runs"))  # none finished there
    assert len(runs) == 2 * (4 + 3 * 2)
    kinds = {(flag(c, "--tasks"), "og" if "--no-gs" in c else flag(c, "--gs-source") or "both") for c in runs}
    assert kinds == {("5", "og"), ("5", "both"), ("5", "batch"), ("5", "history")} | {
        (t, side) for t in ("1", "10", "20") for side in ("og", "both")}
    assert {flag(c, "--iters-per-epoch") for c in runs} == {"20"} and {flag(c, "--epochs") for c in runs} == {"15"}
    assert {flag(c, "--seed") for c in runs} == {"1", "2"} and {flag(c, "--val-tasks") for c in runs} == {"100"}
    assert {out_dir(c).split("__")[0].split("/")[-1] for c in runs} == {"maml_og", "maml_gs", "maml_gs_batch",
                                                                        "maml_gs_history"}


def test_the_full_protocol_ablation_adds_the_two_sources_to_table1s_task_batch_5_rows():
    runs = planned_runs("reproduce-gs-ablation", DATA="/data")
    table1 = [c for c in planned_runs("reproduce-table1", DATA="/data") if flag(c, "--tasks") == "5"]
    assert len(runs) == 6 * 4 and set(table1) <= set(runs)
    extra = [c for c in runs if c not in table1]
    assert sorted(flag(c, "--gs-source") for c in extra) == ["batch"] * 6 + ["history"] * 6


def test_reproduce_sinusoid_is_maml_and_metasgd_with_and_without_sharing_and_maml_cml_at_5_10_20_shots(tmp_path):
    rows = [f"sinusoid-{method}-k{k}" for k in (5, 10, 20) for method in ("maml", "metasgd", "cml")]
    runs = planned_runs(*rows, SEEDS="1 2", RUNS=str(tmp_path / "runs"))  # none finished there
    assert len(runs) == 2 * 3 * 5
    kinds = {(c.split()[2 if c.startswith("echo") else 1], flag(c, "--shots"), flag(c, "--queries"),
              "cml" if "cml.py" in c else "og" if "--no-gs" in c else "gs") for c in runs}
    assert kinds == {(program, k, k, side) for k in ("5", "10", "20")
                     for program, side in (("maml_gs.py", "og"), ("maml_gs.py", "gs"), ("metasgd_gs.py", "og"),
                                           ("metasgd_gs.py", "gs"), ("cml.py", "cml"))}
    # Finn et al.'s protocol (arXiv 1703.03400, Section 5.1, and cbfinn/maml's sinusoid command)
    for name, value in (("--dataset", "sinusoid"), ("--inner-steps", "1"), ("--inner-lr", "0.01"), ("--tasks", "25"),
                        ("--outer-lr", "0.001"), ("--test-tasks", "600")):
        assert {flag(c, name) for c in runs} == {value}, name
    assert {int(flag(c, "--epochs")) * int(flag(c, "--iters-per-epoch")) for c in runs} == {70_000}
    assert {flag(c, "--gamma") for c in runs if "cml.py" in c} == {"1"}
    assert len({out_dir(c) for c in runs}) == len(runs)
    assert all(re.search(r"runs/sinusoid/(maml_og|maml_gs|metasgd_og|metasgd_gs|cml_maml)__sinusoid__k\d+__[12]$",
                         out_dir(c)) for c in runs)

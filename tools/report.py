"""Tables and figures of the papers' reproductions, from run directories, beside the papers' numbers.

    python tools/report.py                                    # runs/ -> results/report.md, results/report/*.png
    python tools/report.py --runs runs --exclude quick demo   # what `make report` runs
    python tools/report.py --runs runs/quick --name quick --only-found --title "Quick reproduction"

Every directory under --runs holding a config.json is a run (common.py's run directory: config.json,
metrics.csv, result.json). Runs whose configurations differ only in the seed or in settings that do not
change the numbers (IGNORED: device, paths, ...) form a group; a group's seeds are summarised together.
The report, results/<name>.md, has one section per paper:

- Gradient sharing (O. Chang and H. Lipson, "Accelerating Meta-Learning by Sharing Gradients", arXiv
  2312.08398): one table per (ways, shots, inner lr) in the layout of the paper's
  Table 1: rows METHOD/TASKS, per dataset the columns ORIGINAL (--no-gs), GRADSHARE (--gs) and SPEED-UP
  (CUB and MiniImagenet share a table; any other dataset, e.g. Omniglot, has tables of its own).
  5-way 5-shot at inner lr 0.1 is Table 1 itself, with the paper's numbers in a "paper" row above ours;
  the other three tables are the remaining panels of Figures 4-11 (1-shot; 10x inner lr), whose numbers
  the paper prints only inside its figures' legends (not transcribed). Figures like the paper's: per
  (dataset, ways, inner lr) a grid of meta-validation curves, rows shots/task batch, columns methods, OG
  and GS with their 95% CI shaded and the legend "MaxVal A Ep B, Test C±D" (Figures 4, 6, 8, 10), and the
  same grid of σ(m), σ(λ) of the GS runs (Figures 5, 7, 9, 11).
- CML ("Cooperative Meta-Learning with Gradient Augmentation", arXiv 2406.04639): one table per data set
  (MiniImagenet, Omniglot, CIFAR-FS, FC100, VGG Flower), rows the bases MAML, MAML++, BOIL and Sharp-MAML, each
  alone and with CML; accuracy per shots, of the top-5 ensemble and of the best single checkpoint (the reference code's
  protocol, beside which the paper's headline number stands); loss curves
  (L_meta, L_co), cos(g_meta, g_co) and the validation curve of each run.
- LWDGH ("Cross-Task Gradient Harmonization for Meta-Learning", anonymous, no arXiv id): Tables 1
  (MiniImagenet), 2 (tieredImageNet, one table per backbone), 3 (ResNet-12), 4 (CUB), 5 (ablation, with the
  GCI column) and 6 (transition epoch; it shares Table 5's runs). Per table
  the validation accuracy, GCI and training loss per epoch (Figure 4), the per-task loss against GCI from
  tasks.csv (Figure 2) and, where both checkpoints and the test data are at hand, MAML's and LWDGH + EE's
  predictions on the meta-test tasks where they differ most (Figure 5).
- Other runs (groups no table shows, e.g. a second configuration of one cell) and every run directory.

Numbers: accuracies in %, the top-5 ensemble's meta-test accuracy (result.json's test_acc_ensemble) ±
the 95% confidence half-width over the test tasks (test_ci_ensemble). With several seeds: mean over
seeds ± their sample standard deviation ("sd"), the seeds counted, and the mean task CI.
SPEED-UP is Chang & Lipson's (arXiv 2312.08398, Section 3, the paragraph after Figure 2's):
(Epoch_OG − Epoch_GS) / Epoch_GS, where Epoch is the earliest epoch at which a run reached its highest
meta-validation accuracy (result.json's max_val_epoch). With several seeds, the means of the two sides'
epochs go into that formula.
A cell with no run says "not yet run"; a run without result.json is marked "unfinished" (with its
epoch); a diverged run (status "diverged", it still has a meta-test) is marked "diverged".
With --only-found, only what was found is shown (no "not yet run" rows for the papers' grids).
The figures' folder, results/<name>/, is emptied of PNGs before the figures are written.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402  (ADDED_LATER, REGRESSION: what a run's config.json means)

REPO = Path(__file__).resolve().parents[1]  # the algorithm files, for Figure 5's predictions

# ---- The papers' numbers ----------------------------------------------------------------------------


class Reported(NamedTuple):
    """An accuracy as a paper prints it: mean and 95% CI in %, with the paper's decimals."""
    acc: float
    ci: float | None
    decimals: int

    def text(self) -> str:
        if self.ci is None:
            return f"{self.acc:.{self.decimals}f}"
        return f"{self.acc:.{self.decimals}f} ± {self.ci:.{self.decimals}f}"


def _r1(acc: float, ci: float) -> Reported:
    return Reported(acc, ci, 1)


def _r2(acc: float, ci: float | None) -> Reported:
    return Reported(acc, ci, 2)


# The papers as the report cites them: in full once per section, then by a short form.
PAPER_002 = "O. Chang and H. Lipson, \"Accelerating Meta-Learning by Sharing Gradients\", arXiv 2312.08398"
PAPER_003 = ("\"Cooperative Meta-Learning with Gradient Augmentation\", arXiv 2406.04639 (the CML paper; "
             "code JJongyn/CML)")
PAPER_004 = ("\"Cross-Task Gradient Harmonization for Meta-Learning\" (the LWDGH paper: anonymous, under double-blind "
             "review, no arXiv id; code built on fmu2/PyTorch-MAML)")
PAPER_002_SHORT = "Chang & Lipson"
PAPER_003_SHORT = "the CML paper"
PAPER_004_SHORT = "the LWDGH paper"

# Chang & Lipson, Table 1 (5-way 5-shot, inner lr 0.1): (method, task batch, dataset) -> (ORIGINAL, GRADSHARE,
# SPEED-UP in %).
PAPER_002_TABLE1: dict[tuple[str, int, str], tuple[Reported, Reported, int]] = {
    ("MAML", 5, "cub"): (_r1(83.2, 1.4), _r1(83.4, 1.4), 66),
    ("MAML", 5, "miniimagenet"): (_r1(67.7, 1.8), _r1(67.0, 1.8), 1),
    ("MAML", 1, "cub"): (_r1(82.6, 1.5), _r1(82.7, 1.5), 44),
    ("MAML", 1, "miniimagenet"): (_r1(66.4, 1.8), _r1(68.3, 1.8), 134),
    ("Meta-SGD", 5, "cub"): (_r1(80.7, 1.5), _r1(80.3, 1.5), 100),
    ("Meta-SGD", 5, "miniimagenet"): (_r1(67.0, 1.8), _r1(67.4, 1.8), 61),
    ("Meta-SGD", 1, "cub"): (_r1(81.6, 1.5), _r1(79.6, 1.6), 54),
    ("Meta-SGD", 1, "miniimagenet"): (_r1(64.8, 1.9), _r1(64.9, 1.9), 37),
    ("MAML++", 5, "cub"): (_r1(72.7, 1.7), _r1(73.8, 1.7), 42),
    ("MAML++", 5, "miniimagenet"): (_r1(68.9, 1.8), _r1(69.4, 1.8), 26),
    ("MAML++", 1, "cub"): (_r1(76.1, 1.7), _r1(76.5, 1.6), 100),
    ("MAML++", 1, "miniimagenet"): (_r1(69.1, 1.8), _r1(66.8, 1.8), 71),
}

# The CML paper: only the headline is in the project's copy (its "Key outcome"): CML on MAML++, MiniImagenet
# 5-way 5-shot, 70.08%, no CI given. (method, shots) -> accuracy.
PAPER_003_MINIIMAGENET: dict[tuple[str, int], Reported] = {("MAML++ + CML", 5): _r2(70.08, None)}

# The LWDGH paper. Table 1 (MiniImagenet, Convnet4), MAML rows: "MAML Finn et al. (2017)" and "MAML+LWDGH (ours)";
# Table 2 (tieredImageNet: Convnet4 1- and 5-shot, Resnet12 1-shot); Table 3 (MiniImagenet, Resnet12, 1-shot,
# the rows "MAML" and "MAML+LWDGH"); Table 4 (Cub200, Convnet4); Table 5 (ablation, MiniImagenet 5-way 1-shot,
# 20 epochs; GCI column); Table 6 (the transition epoch, MiniImagenet 5-way 1-shot, Convnet4: its 33%-cosine
# row is Table 5's LWDGH + EE, 51.33 ± 1.76 in both). The paper's "MAML+LWDGH" of Tables 1-4 is its full
# method, our "MAML + LWDGH + EE" (lwdgh.py). (method, shots) -> accuracy; Table 5's GCI: method -> GCI.
PAPER_004_TABLE1: dict[tuple[str, int], Reported] = {
    ("MAML", 1): _r2(48.17, 1.75), ("MAML", 5): _r2(63.11, 0.91),
    ("MAML + LWDGH + EE", 1): _r2(51.40, 1.76), ("MAML + LWDGH + EE", 5): _r2(67.06, 0.97)}
PAPER_004_TABLE2_CONV4: dict[tuple[str, int], Reported] = {
    ("MAML", 1): _r2(50.10, 1.97), ("MAML", 5): _r2(67.16, 0.91),
    ("MAML + LWDGH + EE", 1): _r2(53.63, 1.80), ("MAML + LWDGH + EE", 5): _r2(67.75, 0.97)}
PAPER_004_TABLE2_RESNET12: dict[tuple[str, int], Reported] = {
    ("MAML", 1): _r2(51.97, 1.76), ("MAML + LWDGH + EE", 1): _r2(60.93, 1.91)}
PAPER_004_TABLE3: dict[tuple[str, int], Reported] = {
    ("MAML", 1): _r2(54.87, 1.82), ("MAML + LWDGH + EE", 1): _r2(59.13, 2.01)}
PAPER_004_TABLE4: dict[tuple[str, int], Reported] = {
    ("MAML", 1): _r2(54.00, 1.78), ("MAML", 5): _r2(61.99, 0.95),
    ("MAML + LWDGH + EE", 1): _r2(58.13, 1.73), ("MAML + LWDGH + EE", 5): _r2(68.11, 0.97)}
PAPER_004_TABLE5: dict[tuple[str, int], Reported] = {
    ("MAML", 1): _r2(48.17, 1.75), ("MAML + LWDGH", 1): _r2(50.73, 1.63), ("MAML + LWDGH + EE", 1): _r2(51.33, 1.76)}
PAPER_004_TABLE5_GCI: dict[str, float] = {"MAML": 4.8171, "MAML + LWDGH": 4.7545, "MAML + LWDGH + EE": 4.7146}
# Table 6: (transition as a fraction of the epochs, schedule) -> accuracy (1-shot).
PAPER_004_TABLE6: dict[tuple[float, str], Reported] = {
    (0.2, "fixed"): _r2(50.43, 1.96), (0.2, "cosine"): _r2(49.67, 1.75), (0.33, "fixed"): _r2(50.80, 1.68),
    (0.33, "cosine"): _r2(51.33, 1.76), (0.5, "fixed"): _r2(50.53, 1.82), (0.5, "cosine"): _r2(50.67, 1.77)}

# ---- Run directories --------------------------------------------------------------------------------

# Config fields that do not change what a run computes (common.RESUME_FREE, the seed, the torch version,
# --recompute: the same meta-gradient, tested): runs differing only in these are seeds of one experiment.
IGNORED = frozenset({"seed", "resume", "quiet", "device", "vmap", "out", "data_root", "cache_dir", "download",
                     "eval_batch", "recompute", "torch", "tensorboard", "machine", "commit"})
NOT_RUN = "not yet run"
ENSEMBLE, BEST = "ensemble", "best"  # result.json's test_acc_ensemble / test_acc_best
NONE = "—"
PERCENT = 100.0


def to_float(text: str | None) -> float:
    """A metrics.csv cell as a float; empty or unreadable cells are NaN."""
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


@dataclass
class Run:
    """One run directory: config.json, metrics.csv (one row per finished epoch), result.json (once done)."""
    path: Path
    config: dict
    metrics: list[dict[str, float]]
    result: dict | None

    @property
    def status(self) -> str:
        """finished / diverged (result.json's status), or unfinished (no result.json yet)."""
        return str(self.result.get("status", "finished")) if self.result is not None else "unfinished"

    @property
    def tested(self) -> bool:
        """Whether the run has a meta-test accuracy (a diverged run before its first epoch has none)."""
        return self.result is not None and self.result.get("test_acc_ensemble") is not None

    def column(self, name: str) -> list[float]:
        return [row.get(name, math.nan) for row in self.metrics]

    def max_val(self) -> tuple[float, int] | None:
        """(highest validation accuracy, earliest epoch reaching it): result.json's, else from metrics.csv."""
        if self.result is not None and self.result.get("max_val_epoch") is not None:
            return float(self.result["max_val_acc"]), int(self.result["max_val_epoch"])
        rows = [row for row in self.metrics if not math.isnan(row.get("val_acc", math.nan))]
        if not rows:
            return None
        best = max(rows, key=lambda row: (row["val_acc"], -row["epoch"]))
        return best["val_acc"], int(best["epoch"])

    def progress(self) -> str:
        """"epoch 12/150": epochs done of those configured."""
        return f"epoch {len(self.metrics)}/{self.config.get('epochs', '?')}"


def read_run(run_dir: Path) -> Run:
    """The run in run_dir (which holds a config.json); a missing metrics.csv is no epoch yet."""
    config = json.loads((run_dir / "config.json").read_text())
    metrics: list[dict[str, float]] = []
    if (run_dir / "metrics.csv").is_file():
        with open(run_dir / "metrics.csv", newline="") as f:
            metrics = [{key: to_float(value) for key, value in row.items()} for row in csv.DictReader(f)]
    result = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").is_file() else None
    return Run(run_dir, config, metrics, result)


def find_runs(roots: Iterable[Path], exclude: Iterable[str] = ()) -> list[Run]:
    """Every run directory below the roots (sorted), but those under an excluded path relative to a root."""
    skipped = [Path(e).parts for e in exclude]
    runs = []
    for root in roots:
        if not Path(root).is_dir():  # a missing folder holds no runs (main warns about it)
            continue
        for config in sorted(Path(root).rglob("config.json")):
            relative = config.parent.relative_to(root).parts
            if any(relative[:len(parts)] == parts for parts in skipped):
                continue
            try:
                runs.append(read_run(config.parent))
            except (OSError, ValueError) as e:  # a damaged file: say so, report the rest
                print(f"warning: skipped {config.parent}: {e}", file=sys.stderr)
    return runs


def experiment_key(config: dict, drop: Iterable[str] = ()) -> str:
    """The configuration without IGNORED (and `drop`) fields, as a canonical string."""
    dropped = IGNORED | set(drop)
    return json.dumps({k: v for k, v in config.items() if k not in dropped}, sort_keys=True)


@dataclass
class Group:
    """The runs of one experiment, one per seed (or several runs of a seed)."""
    config: dict
    runs: list[Run]

    @property
    def tested(self) -> list[Run]:
        return [run for run in self.runs if run.tested]

    def rank(self) -> tuple:
        """Which of several configurations of one table cell the table shows: most tested runs, then runs,
        then the longest, then the path (deterministic)."""
        return (-len(self.tested), -len(self.runs), -int(self.config.get("epochs", 0)), str(self.runs[0].path))


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Runs of one configuration (but seeds and IGNORED fields) together, in the order first found."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = experiment_key({**common.ADDED_LATER, **run.config})  # runs from before a flag existed: its value
        groups.setdefault(key, Group(run.config, [])).runs.append(run)
    return list(groups.values())


# ---- Cell texts -------------------------------------------------------------------------------------


def speed_up(epoch_og: float, epoch_gs: float) -> float:
    """Chang & Lipson (arXiv 2312.08398), Section 3: Speed-up = (Epoch_OG − Epoch_GS) / Epoch_GS, each the
    earliest epoch at which the highest meta-validation accuracy is achieved (OG: the original method, GS: gradient
    sharing)."""
    return (epoch_og - epoch_gs) / epoch_gs


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def accuracy_text(group: Group | None, decimals: int = 2, model: str = ENSEMBLE) -> str:
    """Meta-test accuracy of the group's runs: "83.21 ± 1.40" (one seed, ± the 95% task CI) or
    "83.21 ± 0.35 sd, 3 seeds (task CI ± 1.40)"; diverged and unfinished runs marked; "not yet run".
    model: ENSEMBLE (the top-5 ensemble, result.json's test_acc_ensemble) or BEST (test_acc_best)."""
    if group is None or not group.runs:
        return NOT_RUN
    parts = []
    tested = group.tested
    if tested:
        accs = [PERCENT * run.result[f"test_acc_{model}"] for run in tested]
        cis = [PERCENT * run.result[f"test_ci_{model}"] for run in tested]
        if len(tested) == 1:
            parts.append(f"{accs[0]:.{decimals}f} ± {cis[0]:.{decimals}f}")
        else:
            parts.append(f"{statistics.mean(accs):.{decimals}f} ± {_spread(accs):.{decimals}f} sd, {len(tested)} seeds "
                         f"(task CI ± {statistics.mean(cis):.{decimals}f})")
        diverged = sum(run.status == "diverged" for run in tested)
        if diverged:
            parts.append("diverged" if len(tested) == 1 else f"{diverged} of {len(tested)} diverged")
    untested = [run for run in group.runs if run.result is not None and not run.tested]
    if untested:
        parts.append(f"{len(untested)} diverged before any epoch" if len(untested) > 1 else "diverged before any epoch")
    unfinished = [run for run in group.runs if run.result is None]
    if unfinished:
        parts.append("unfinished: " + ", ".join(run.progress() for run in unfinished))
    return "; ".join(parts)


def _best_epochs(group: Group | None) -> list[int]:
    return [int(run.result["max_val_epoch"]) for run in (group.runs if group else [])
            if run.result is not None and run.result.get("max_val_epoch") is not None]


def speed_up_text(og: Group | None, gs: Group | None) -> str:
    """"66% (OG ep 50, GS ep 30)" from the runs with a result.json; with several seeds the mean epochs."""
    epochs_og, epochs_gs = _best_epochs(og), _best_epochs(gs)
    if not epochs_og or not epochs_gs:
        return NONE
    mean_og, mean_gs = statistics.mean(epochs_og), statistics.mean(epochs_gs)
    value = speed_up(mean_og, mean_gs)
    if len(epochs_og) == 1 and len(epochs_gs) == 1:
        text = f"{value:.0%} (OG ep {epochs_og[0]}, GS ep {epochs_gs[0]})"
    else:
        text = (f"{value:.0%} (mean OG ep {mean_og:.1f} of {len(epochs_og)} seeds, "
                f"GS ep {mean_gs:.1f} of {len(epochs_gs)})")
    diverged = [side for side, group in (("OG", og), ("GS", gs)) if any(r.status == "diverged" for r in group.runs)]
    return text + "".join(f"; {side} diverged" for side in diverged)


def mean_column_text(group: Group | None, column: str, decimals: int = 4) -> str:
    """The mean over epochs of a metrics.csv column (e.g. LWDGH's gci_mean), mean ± sd over seeds."""
    if group is None:
        return NOT_RUN
    values = []
    for run in group.runs:
        finite = [v for v in run.column(column) if not math.isnan(v)]
        if finite:
            values.append(statistics.mean(finite))
    if not values:
        return NONE
    if len(values) == 1:
        return f"{values[0]:.{decimals}f}"
    return f"{statistics.mean(values):.{decimals}f} ± {_spread(values):.{decimals}f} sd, {len(values)} seeds"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table ('|' in a cell escaped)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header))] + [line(row) for row in rows])


# ---- Figures ----------------------------------------------------------------------------------------

PANEL_W, PANEL_H = 4.8, 3.4  # inches per subplot
DPI = 110
SEED_STYLES = ("-", "--", ":", "-.")
CI_ALPHA = 0.2
OG_COLOR, GS_COLOR = "tab:blue", "tab:orange"
LINE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
LEGEND_SIZE = 7
SUPTITLE_SIZE = 10


def seed_style(index: int) -> str:
    return SEED_STYLES[index % len(SEED_STYLES)]


def legend_label(name: str, run: Run, with_seed: bool) -> str:
    """The paper's legend: "GS: MaxVal 83.20 Ep 50, Test 83.21±1.40" (in %), marked when unfinished/diverged."""
    label = f"{name} seed {run.config.get('seed')}" if with_seed else name
    best = run.max_val()
    text = f"{label}: MaxVal {PERCENT * best[0]:.2f} Ep {best[1]}" if best else f"{label}: no epoch yet"
    if run.tested:
        text += f", Test {PERCENT * run.result['test_acc_ensemble']:.2f}±{PERCENT * run.result['test_ci_ensemble']:.2f}"
    if run.status != "finished":
        text += f" ({run.status})"
    return text


def plot_validation(ax: plt.Axes, run: Run, label: str, color: str, style: str) -> None:
    """Meta-validation accuracy (%) per epoch with its 95% CI over the validation tasks shaded."""
    epochs, acc, ci = run.column("epoch"), run.column("val_acc"), run.column("val_ci")
    low = [PERCENT * (a - c) for a, c in zip(acc, ci)]
    high = [PERCENT * (a + c) for a, c in zip(acc, ci)]
    ax.plot(epochs, [PERCENT * a for a in acc], style, color=color, label=label, linewidth=1)
    ax.fill_between(epochs, low, high, color=color, alpha=CI_ALPHA, linewidth=0)


def empty_panel(ax: plt.Axes, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.text(0.5, 0.5, NOT_RUN, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def save_figure(fig: plt.Figure, path: Path, integer_x: bool = True) -> Path:
    for ax in fig.axes:
        if integer_x and ax.has_data():  # epochs are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def panel_grid(rows: int, cols: int) -> tuple[plt.Figure, list[list[plt.Axes]]]:
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_W * cols, PANEL_H * rows), squeeze=False)
    return fig, [list(row) for row in axes]


# ---- Gradient sharing (Chang & Lipson, arXiv 2312.08398) -----------------------------------------------

GS_PROGRAMS = {"maml_gs": "MAML", "metasgd_gs": "Meta-SGD", "mamlpp_gs": "MAML++"}
GS_METHOD_ORDER = list(GS_PROGRAMS.values())
GS_TASK_ORDER = (5, 1)  # the paper's rows: task batch 5, then 1
PAPER_DATASETS = ("cub", "miniimagenet")
PAPER = "paper"  # the dataset family of PAPER_DATASETS
DATASET_NAMES = {"cub": "CUB", "miniimagenet": "MiniImagenet", "tieredimagenet": "tieredImageNet",
                 "omniglot": "Omniglot", "cifarfs": "CIFAR-FS", "fc100": "FC100", "vggflower": "VGG Flower",
                 "synthetic": "Synthetic"}
DEFAULT_INNER_LR = 0.1
PAPER_WAYS = 5
# The paper's grid: (ways, shots, inner lr, PAPER) -> where the paper shows it.
GS_PAPER_TABLES = {
    (PAPER_WAYS, 5, DEFAULT_INNER_LR, PAPER): f"{PAPER_002_SHORT}, Table 1; also the 5-shot panels of Figures 4-7",
    (PAPER_WAYS, 1, DEFAULT_INNER_LR, PAPER): f"{PAPER_002_SHORT}, the 1-shot panels of Figures 4-7; "
                                              "the paper's numbers only in the figures' legends",
    (PAPER_WAYS, 5, 10 * DEFAULT_INNER_LR, PAPER): f"{PAPER_002_SHORT}, the 5-shot panels of Figures 8-11, "
                                                   "10× inner lr; the paper's numbers only in the figures' legends",
    (PAPER_WAYS, 1, 10 * DEFAULT_INNER_LR, PAPER): f"{PAPER_002_SHORT}, the 1-shot panels of Figures 8-11, "
                                                   "10× inner lr; the paper's numbers only in the figures' legends",
}
TABLE1 = (PAPER_WAYS, 5, DEFAULT_INNER_LR, PAPER)
# Full Omniglot (`make reproduce-omniglot`: the MAML++ reference's configs, task batch 8), beside the published
# numbers: Finn et al. 2017 (arXiv 1703.03400), Table 1, MAML. MAML++ (arXiv 1810.09502, Tables 1-2) and Meta-SGD
# (arXiv 1707.09835, Table 1) are not transcribed: neither paper is in this project's copy, and none is guessed.
OMNIGLOT, OMNIGLOT_TASKS = "omniglot", 8
PUBLISHED_OMNIGLOT: dict[tuple[str, int, int], Reported] = {
    ("MAML", 5, 1): _r1(98.7, 0.4), ("MAML", 5, 5): _r1(99.9, 0.1), ("MAML", 20, 1): _r1(95.8, 0.3),
    ("MAML", 20, 5): _r1(98.9, 0.2)}
NOT_TRANSCRIBED = "not transcribed"
OMNIGLOT_TABLES = {(ways, shots, DEFAULT_INNER_LR, OMNIGLOT): "reproduce-omniglot; published: Finn et al. 2017, "
                   "Table 1 (MAML, without gradient sharing); MAML++'s and Meta-SGD's not transcribed"
                   for ways in (5, 20) for shots in (1, 5)}
GS_FIGURES = {("cub", DEFAULT_INNER_LR): (4, 5), ("miniimagenet", DEFAULT_INNER_LR): (6, 7),
              ("cub", 10 * DEFAULT_INNER_LR): (8, 9), ("miniimagenet", 10 * DEFAULT_INNER_LR): (10, 11)}


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def lr_text(lr: float) -> str:
    """0.1, 1.0: as the Makefile's run directories spell inner learning rates."""
    return str(float(lr))


def dataset_family(dataset: str) -> str:
    """Which table a dataset's column goes into: the paper's datasets share one, any other has its own."""
    return PAPER if dataset in PAPER_DATASETS else dataset


@dataclass
class Pair:
    """The OG (--no-gs) and GS (--gs) groups of one configuration."""
    og: Group | None = None
    gs: Group | None = None

    def groups(self) -> list[Group]:
        return [g for g in (self.og, self.gs) if g is not None]

    def rank(self) -> tuple:
        ranks = [g.rank() for g in self.groups()]
        return (-sum(len(g.tested) for g in self.groups()), -sum(len(g.runs) for g in self.groups()), min(ranks))


def gs_cells(groups: list[Group]) -> dict[tuple, list[Pair]]:
    """(ways, shots, inner lr, dataset family, method, tasks, dataset) -> the OG/GS pairs found there, one per
    configuration, the one a table shows first (Pair.rank)."""
    pairs: dict[tuple, dict[str, Pair]] = defaultdict(dict)
    for group in groups:
        c = group.config
        if c.get("program") not in GS_PROGRAMS or c.get("gs_source", "both") != "both":
            continue  # --gs-source batch / history: the ablation's runs, beside these (reproduce-gs-ablation)
        cell = (int(c["ways"]), int(c["shots"]), float(c["inner_lr"]), dataset_family(str(c["dataset"])),
                GS_PROGRAMS[c["program"]], int(c["tasks"]), str(c["dataset"]))
        pair = pairs[cell].setdefault(experiment_key(c, drop=("gs", "algorithm")), Pair())
        if c.get("gs"):
            pair.gs = group
        else:
            pair.og = group
    return {cell: sorted(found.values(), key=Pair.rank) for cell, found in pairs.items()}


def _ordered(found: Iterable, preferred: Iterable) -> list:
    """The preferred values first (in their order), then the other found ones sorted."""
    preferred = list(preferred)
    return preferred + sorted(set(found) - set(preferred), key=str)


def gs_section(cells: dict[tuple, list[Pair]], only_found: bool, figure_dir: Path,
               link_dir: str) -> tuple[str, set[int]]:
    """Chang & Lipson's (gradient sharing) tables and figures; returns the markdown and the ids of the groups it
    shows."""
    shown: set[int] = set()
    chosen = {cell: pairs[0] for cell, pairs in cells.items()}
    for pair in chosen.values():
        shown.update(id(g) for g in pair.groups())
    tables = {cell[:4] for cell in chosen} | (set() if only_found else set(GS_PAPER_TABLES) | set(OMNIGLOT_TABLES))
    if not tables:
        return "", shown
    source = "The paper's numbers: its Table 1. " if TABLE1 in tables else ""
    out = ["## Gradient sharing (MAML, Meta-SGD, MAML++)", "",
           f"Paper: {PAPER_002}. " + source + "ORIGINAL: the method without gradient sharing (`--no-gs`), "
           "GRADSHARE: with it (`--gs`); accuracy (%) of the top-5 ensemble on the meta-test tasks ± 95% CI; "
           "SPEED-UP = (Epoch_OG − Epoch_GS) / Epoch_GS with Epoch the earliest epoch of the highest meta-validation "
           f"accuracy ({PAPER_002_SHORT}, Section 3).", ""]
    for table in sorted(tables, key=lambda t: (t[3] != PAPER, t[3], t[0], t[2], -t[1])):
        ways, shots, lr, family = table
        in_table = {cell: pair for cell, pair in chosen.items() if cell[:4] == table}
        omniglot = table in OMNIGLOT_TABLES and not only_found  # --only-found: the runs alone, no published row
        expected = (table in GS_PAPER_TABLES or omniglot) and not only_found
        datasets = _ordered({c[6] for c in in_table}, ([OMNIGLOT] if omniglot else PAPER_DATASETS) if expected else ())
        tasks_order = (OMNIGLOT_TASKS,) if omniglot else GS_TASK_ORDER
        rows = _ordered({(c[4], c[5]) for c in in_table},
                        [(m, t) for m in GS_METHOD_ORDER for t in tasks_order] if expected else ())
        rows = sorted(rows, key=lambda r: (GS_METHOD_ORDER.index(r[0]) if r[0] in GS_METHOD_ORDER
                                           else len(GS_METHOD_ORDER),
                                           -r[1]))
        paper = table == TABLE1 or omniglot
        title = f"### {ways}-way {shots}-shot, inner lr {lr_text(lr)}" + (
            "" if family == PAPER else f", {dataset_name(family)}")
        where = GS_PAPER_TABLES.get(table) or (OMNIGLOT_TABLES[table] if omniglot else None)
        out += [title + (f" ({where})" if where else ""), ""]
        header = ["METHOD/TASKS"] + (["source"] if paper else [])
        for d in datasets:
            name = dataset_name(d).upper()
            header += [f"{name} ORIGINAL", f"{name} GRADSHARE", f"{name} SPEED-UP"]
        lines = []
        for method, tasks in rows:
            label = f"{method.upper()}/{tasks}"
            if paper and omniglot:  # a published number without gradient sharing, where transcribed
                value = PUBLISHED_OMNIGLOT.get((method, ways, shots)) if tasks == OMNIGLOT_TASKS else None
                cells_paper = []
                for d in datasets:
                    cells_paper += [value.text() if value and d == OMNIGLOT else NOT_TRANSCRIBED, NONE, NONE]
                lines.append([label, "published"] + cells_paper)
            elif paper:
                reported = [PAPER_002_TABLE1.get((method, tasks, d)) for d in datasets]
                cells_paper = []
                for value in reported:
                    cells_paper += [value[0].text(), value[1].text(), f"{value[2]}%"] if value else [NONE] * 3
                lines.append([label, "paper"] + cells_paper)
            ours = []
            for d in datasets:
                pair = in_table.get((ways, shots, lr, family, method, tasks, d))
                if pair is None:
                    ours += [NOT_RUN, NOT_RUN, NONE]
                else:
                    ours += [accuracy_text(pair.og), accuracy_text(pair.gs), speed_up_text(pair.og, pair.gs)]
            lines.append(["" if paper else label] + (["ours"] if paper else []) + ours)
        out += [markdown_table(header, lines), ""]
    out += gs_figures(chosen, figure_dir, link_dir)
    return "\n".join(out), shown


def gs_figures(chosen: dict[tuple, Pair], figure_dir: Path, link_dir: str) -> list[str]:
    """Per (dataset, ways, inner lr): the validation grid (Figures 4, 6, 8, 10) and the σ(m), σ(λ) grid
    (Figures 5, 7, 9, 11); rows shots × task batch, columns methods. Returns the markdown links."""
    figures: dict[tuple, dict[tuple, Pair]] = defaultdict(dict)
    for (ways, shots, lr, _, method, tasks, dataset), pair in chosen.items():
        figures[(dataset, ways, lr)][(shots, tasks, method)] = pair
    lines = []
    for (dataset, ways, lr), panels in sorted(figures.items(), key=lambda item: (item[0][0], item[0][1], item[0][2])):
        rows = sorted({(s, t) for s, t, _ in panels}, key=lambda r: (r[0], -r[1]))
        cols = [m for m in GS_METHOD_ORDER if any(p[2] == m for p in panels)]
        stem = f"{dataset}_{ways}w_lr{lr_text(lr)}"
        where = GS_FIGURES.get((dataset, lr)) if ways == PAPER_WAYS else None
        val = _gs_grid(panels, rows, cols, figure_dir / f"val_{stem}.png", _plot_val_panel,
                       f"Meta-validation, {dataset_name(dataset)} {ways}-way, inner lr {lr_text(lr)}")
        sigma = _gs_grid(panels, rows, cols, figure_dir / f"sigma_{stem}.png", _plot_sigma_panel,
                         f"σ(m), σ(λ), {dataset_name(dataset)} {ways}-way, inner lr {lr_text(lr)}")
        note = f" (as the paper's Figures {where[0]} and {where[1]})" if where else ""
        lines += [f"Figures, {dataset_name(dataset)} {ways}-way, inner lr {lr_text(lr)}{note}: meta-validation "
                  "accuracy per epoch (95% CI shaded), and the means over k of σ(m_k), σ(λ_k) of the GS runs.", "",
                  f"![validation]({link_dir}/{val.name})", "", f"![sigma]({link_dir}/{sigma.name})", ""]
    return lines


def _gs_grid(panels: dict[tuple, Pair], rows: list[tuple[int, int]], cols: list[str], path: Path,
             draw: Callable[[plt.Axes, Pair, str], None], title: str) -> Path:
    fig, axes = panel_grid(len(rows), len(cols))
    for i, (shots, tasks) in enumerate(rows):
        for j, method in enumerate(cols):
            name = f"{method}, {shots}-shot, task batch {tasks}"
            pair = panels.get((shots, tasks, method))
            if pair is None:
                empty_panel(axes[i][j], name)
            else:
                draw(axes[i][j], pair, name)
    fig.suptitle(title, fontsize=SUPTITLE_SIZE)
    return save_figure(fig, path)


def _plot_val_panel(ax: plt.Axes, pair: Pair, title: str) -> None:
    for side, group, color in (("OG", pair.og, OG_COLOR), ("GS", pair.gs, GS_COLOR)):
        runs = group.runs if group else []
        for k, run in enumerate(runs):
            plot_validation(ax, run, legend_label(side, run, len(runs) > 1), color, seed_style(k))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("meta-validation accuracy (%)")
    ax.legend(fontsize=LEGEND_SIZE, loc="lower right")


def _plot_sigma_panel(ax: plt.Axes, pair: Pair, title: str) -> None:
    runs = pair.gs.runs if pair.gs else []
    if not runs:
        empty_panel(ax, title)
        return
    for k, run in enumerate(runs):
        seed = f" seed {run.config.get('seed')}" if len(runs) > 1 else ""
        ax.plot(run.column("epoch"), run.column("sigma_m"), seed_style(k), color=LINE_COLORS[2], label=f"σ(m){seed}")
        ax.plot(run.column("epoch"), run.column("sigma_lambda"), seed_style(k), color=LINE_COLORS[3],
                label=f"σ(λ){seed}")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean σ over k")
    ax.legend(fontsize=LEGEND_SIZE)


# ---- The CML and LWDGH papers: rows = methods, columns = shots --------------------------------

CML_BASES = {"maml": "MAML", "mamlpp": "MAML++", "boil": "BOIL", "sharpmaml": "Sharp-MAML"}
CML_METHOD_ORDER = ["MAML", "MAML + CML", "MAML++", "MAML++ + CML", "BOIL", "BOIL + CML", "Sharp-MAML",
                    "Sharp-MAML + CML"]
# The CML paper's image data sets (the Makefile's reproduce-cml rows); only the MiniImagenet headline is in our copy.
CML_DATASETS = ("miniimagenet", "omniglot", "cifarfs", "fc100", "vggflower")
LWDGH_METHOD_ORDER = ["MAML", "MAML + LWDGH", "MAML + LWDGH + EE"]
CML_LOSSES = ("loss_meta", "loss_co", "train_loss")
LWDGH_GCI = "gci_mean"  # the LWDGH paper's Table 5's GCI: Eq. 3 w.r.t. the plain mean gradient, summed over tasks
# The LWDGH paper's epochs as lwdgh.py's docstring and the Makefile run them: Tables 1 and 4, 300 (our assumption:
# the paper gives none); Table 5, 20 (the paper's).
LWDGH_EPOCHS, LWDGH_ABLATION_EPOCHS = 300, 20
def lwdgh_rank(method: str) -> int:
    """A row's place among the LWDGH paper's methods (Table 6's variants after them)."""
    return LWDGH_METHOD_ORDER.index(method) if method in LWDGH_METHOD_ORDER else len(LWDGH_METHOD_ORDER)


LWDGH_TRANSITION, LWDGH_SCHEDULE = 0.33, "cosine"  # lwdgh.py's defaults: Table 6's best row, the other tables'
BACKBONES = {"conv4": "Convnet4", "resnet12": "ResNet-12"}


def transition_name(transition: float, schedule: str) -> str:
    """Table 6's row of an LWDGH + EE run: "MAML + LWDGH + EE" at the defaults, else with its E and schedule."""
    if (transition, schedule) == (LWDGH_TRANSITION, LWDGH_SCHEDULE):
        return "MAML + LWDGH + EE"
    return f"MAML + LWDGH + EE, E {transition:.0%} {schedule}"


def cml_method(config: dict) -> str:
    """"MAML + CML" / "MAML++ + CML"; γ = 0 is exactly the base method (tested), named so."""
    base = CML_BASES.get(config.get("base"), str(config.get("base")))
    return base if float(config.get("gamma", 1.0)) == 0 else f"{base} + CML"


def lwdgh_method(config: dict) -> str:
    """MAML (--p-min 1 --p-max 1: always the plain mean gradient), MAML + LWDGH (--no-ee: always harmonised),
    MAML + LWDGH + EE (the explore-exploit schedule)."""
    if not config.get("ee", True):
        return "MAML + LWDGH"
    if float(config.get("p_min", 0.0)) >= 1:
        return "MAML"
    return transition_name(float(config.get("transition", LWDGH_TRANSITION)),
                           str(config.get("schedule", LWDGH_SCHEDULE)))


@dataclass
class PaperTable:
    """What a paper shows for one table of ours: its name, rows, columns and numbers."""
    title: str
    rows: list[str]
    shots: list[int]
    numbers: dict[tuple[str, int], Reported]
    gci: dict[str, float] | None = None
    model: str = ENSEMBLE  # which of our meta-test numbers the paper's are comparable with
    labels: dict[str, str] | None = None  # a row's name in this table where it is not the method's name


@dataclass
class Family:
    """A program whose results form tables of rows = methods, columns = shots."""
    program: str
    heading: str
    citation: str  # the paper, in full (title, authors, arXiv id)
    source: str  # where the paper's numbers are in it
    table_key: Callable[[dict], tuple]
    table_title: Callable[[tuple], str]
    method: Callable[[dict], str]
    order: list[str]
    paper: dict[tuple, list[PaperTable]]  # a table key's tables (the LWDGH paper's Tables 5 and 6 share runs)
    extra_column: str | None  # a metrics.csv column averaged over epochs, shown beside each accuracy
    best_single: bool  # also show the best single checkpoint's meta-test accuracy (result.json's test_acc_best)
    figure: Callable[[tuple, dict[tuple[str, int], Group], Path], list[Path]]

    def rank(self, method: str) -> int:
        """Where a method's row goes: by `order`, the methods it does not name last."""
        return self.order.index(method) if method in self.order else len(self.order)


def method_section(family: Family, groups: list[Group], only_found: bool, figure_dir: Path,
                   link_dir: str) -> tuple[str, set[int]]:
    """A family's tables, with a "paper" row above ours where the paper has numbers, and its figures."""
    cells: dict[tuple, list[Group]] = defaultdict(list)
    for group in groups:
        if group.config.get("program") == family.program:
            c = group.config
            cells[(family.table_key(c), family.method(c), int(c["shots"]))].append(group)
    chosen = {cell: min(found, key=Group.rank) for cell, found in cells.items()}
    shown = {id(g) for g in chosen.values()}
    tables = {cell[0] for cell in chosen} | (set() if only_found else set(family.paper))
    if not tables:
        return "", shown
    source = f"The paper's numbers: {family.source}. " if any(t in family.paper for t in tables) else ""
    out = [f"## {family.heading}", "",
           f"Paper: {family.citation}. " + source
           + "Accuracy (%) of the top-5 ensemble on the meta-test tasks ± 95% CI.", ""]
    paper_order = list(family.paper)
    for table in sorted(tables, key=lambda t: (paper_order.index(t) if t in paper_order else len(paper_order), str(t))):
        mine = {(m, s): g for (t, m, s), g in chosen.items() if t == table}
        found = {m for m, _ in mine}
        papers = family.paper.get(table) or [None]
        claimed = {row for paper in papers if paper for row in paper.rows}
        for i, paper in enumerate(papers):
            expected = paper is not None and not only_found
            rows = [r for r in paper.rows if expected or r in found] if paper else []
            rows += sorted(found - claimed, key=family.rank) if i == 0 else []  # runs no paper row names: 1st table
            if not rows:
                continue
            out += method_table(family, table, paper, expected, rows, mine)
        for path in family.figure(table, mine, figure_dir):
            out += [f"![{path.stem}]({link_dir}/{path.name})", ""]
    return "\n".join(out), shown


def method_table(family: Family, table: tuple, paper: PaperTable | None, expected: bool, rows: list[str],
                 mine: dict[tuple[str, int], Group]) -> list[str]:
    """One table: a "paper" row above ours for each method the paper has, a column per shots (and model)."""
    shots = sorted({s for m, s in mine if m in rows} | set(paper.shots if expected else []))
    models = [ENSEMBLE, BEST] if family.best_single else [ENSEMBLE]
    model_names = {ENSEMBLE: " ensemble", BEST: " best single"} if family.best_single else {ENSEMBLE: ""}
    header = ["Method", "source"]
    for s in shots:
        header += [f"{s}-shot{model_names[model]}" for model in models]
        header += [f"{s}-shot GCI"] if family.extra_column else []
    lines = []
    for method in rows:
        label = (paper.labels or {}).get(method, method) if paper else method
        if paper:
            reported = []
            for s in shots:
                value = paper.numbers.get((method, s))
                reported += [value.text() if value and model == paper.model else NONE for model in models]
                if family.extra_column:
                    gci = paper.gci.get(method) if paper.gci and (method, s) in paper.numbers else None
                    reported.append(f"{gci:.4f}" if gci is not None else NONE)
            lines.append([label, "paper"] + reported)
        ours = []
        for s in shots:
            group = mine.get((method, s))
            ours += [accuracy_text(group, model=model) for model in models]
            if family.extra_column:
                ours.append(mean_column_text(group, family.extra_column) if group else NONE)
        lines.append(["" if paper else label, "ours"] + ours)
    return [f"### {family.table_title(table)}" + (f" ({paper.title})" if paper else ""), "",
            markdown_table(header, lines), ""]


def _cml_figure(table: tuple, cells: dict[tuple[str, int], Group], figure_dir: Path) -> list[Path]:
    """Per CML cell: the loss curves (L_meta, L_co, their weighted sum), cos(g_meta, g_co), validation."""
    paths = []
    dataset, ways = table
    for (method, shots), group in sorted(cells.items()):
        fig, axes = panel_grid(1, 3)
        losses, cosine, val = axes[0]
        for k, run in enumerate(group.runs):
            seed = f" seed {run.config.get('seed')}" if len(group.runs) > 1 else ""
            for column, color in zip(CML_LOSSES, LINE_COLORS):
                losses.plot(run.column("epoch"), run.column(column), seed_style(k), color=color, label=column + seed)
            cosine.plot(run.column("epoch"), run.column("grad_cos"), seed_style(k), color=LINE_COLORS[0],
                        label="cos(g_meta, g_co)" + seed)
            plot_validation(val, run, legend_label(method, run, len(group.runs) > 1), LINE_COLORS[k % len(LINE_COLORS)],
                            seed_style(k))
        for ax, title, ylabel in ((losses, "query losses", "loss"), (cosine, "meta-gradient cosine", "cosine"),
                                  (val, "meta-validation", "accuracy (%)")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=LEGEND_SIZE)
        fig.suptitle(f"{method}, {dataset_name(dataset)} {ways}-way {shots}-shot", fontsize=SUPTITLE_SIZE)
        slug = method.lower().replace("++", "pp").replace(" + ", "_")
        paths.append(save_figure(fig, figure_dir / f"cml_{slug}_{dataset}_{ways}w{shots}s.png"))
    return paths


def _lwdgh_figure(table: tuple, cells: dict[tuple[str, int], Group], figure_dir: Path) -> list[Path]:
    """Per LWDGH table: validation accuracy, GCI and training loss (the LWDGH paper's Figure 4) per epoch, a column per
    shots; each run's per-task query loss against its GCI (Figure 2); MAML's and LWDGH's predictions (Figure 5)."""
    dataset, ways, epochs, backbone = table
    shots = sorted({s for _, s in cells})
    if not shots:
        return []
    fig, axes = panel_grid(3, len(shots))
    for j, s in enumerate(shots):
        val, gci, loss = axes[0][j], axes[1][j], axes[2][j]
        methods = sorted((m for m, shot in cells if shot == s), key=lwdgh_rank)
        for i, method in enumerate(methods):
            group = cells[(method, s)]
            color = LINE_COLORS[i % len(LINE_COLORS)]
            for k, run in enumerate(group.runs):
                plot_validation(val, run, legend_label(method, run, len(group.runs) > 1), color, seed_style(k))
                gci.plot(run.column("epoch"), run.column(LWDGH_GCI), seed_style(k), color=color, label=method)
                loss.plot(run.column("epoch"), run.column("train_loss"), seed_style(k), color=color, label=method)
        val.set_title(f"meta-validation, {s}-shot", fontsize=9)
        val.set_ylabel("accuracy (%)")
        gci.set_title(f"GCI (w.r.t. the mean gradient), {s}-shot", fontsize=9)
        gci.set_ylabel("GCI, epoch mean")
        loss.set_title(f"training query loss (LWDGH paper, Figure 4), {s}-shot", fontsize=9)
        loss.set_ylabel("loss, epoch mean")
        for ax in (val, gci, loss):
            ax.set_xlabel("epoch")
            ax.legend(fontsize=LEGEND_SIZE)
    name = f"{dataset}_{ways}w_{epochs}ep" + ("" if backbone == "conv4" else f"_{backbone}")
    fig.suptitle(f"LWDGH, {dataset_name(dataset)} {ways}-way, {BACKBONES.get(backbone, backbone)}, {epochs} epochs",
                 fontsize=SUPTITLE_SIZE)
    paths = [save_figure(fig, figure_dir / f"lwdgh_{name}.png")]
    return paths + _loss_against_gci(cells, name, figure_dir) + _predictions(cells, name, figure_dir)


def read_tasks(run: Run) -> list[dict[str, float]]:
    """The run's tasks.csv (common.Run: per-task numbers of the first meta-iterations of every epoch), or []."""
    path = run.path / "tasks.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{key: to_float(value) for key, value in row.items()} for row in csv.DictReader(f)]


def _loss_against_gci(cells: dict[tuple[str, int], Group], name: str, figure_dir: Path) -> list[Path]:
    """The LWDGH paper's Figure 2 for every cell's first run: the tasks logged in its first and in its last epoch, query
    loss against GCI (Eq. 3: the task's gradient against the batch's mean gradient, whole θ), each epoch with its
    least-squares line."""
    ordered = sorted(cells.items(), key=lambda cell: (cell[0][1], lwdgh_rank(cell[0][0])))  # by shots, then method
    panels = [(method, s, rows) for (method, s), group in ordered if (rows := read_tasks(group.runs[0]))]
    if not panels:
        return []
    fig, axes = panel_grid(1, len(panels))
    for ax, (method, s, rows) in zip(axes[0], panels):
        for epoch, color in zip(sorted({rows[0]["epoch"], rows[-1]["epoch"]}), LINE_COLORS):
            x = np.array([r["gci"] for r in rows if r["epoch"] == epoch])
            y = np.array([r["loss"] for r in rows if r["epoch"] == epoch])
            ax.scatter(x, y, s=8, color=color, alpha=0.6, label=f"epoch {epoch:.0f}: {len(x)} tasks")
            if len(x) > 1 and np.ptp(x) > 0 and np.ptp(y) > 0:
                slope, intercept = np.polyfit(x, y, 1)
                ends = np.array([x.min(), x.max()])
                ax.plot(ends, slope * ends + intercept, color=color,
                        label=f"least squares: slope {slope:.3g}, r = {np.corrcoef(x, y)[0, 1]:.2f}")
        ax.set_title(f"{method}, {s}-shot", fontsize=9)
        ax.set_xlabel("GCI of the task (Eq. 3, whole θ)")
        ax.set_ylabel("query loss of the task")
        ax.legend(fontsize=LEGEND_SIZE)
    fig.suptitle("Loss against GCI (LWDGH paper, Figure 2)", fontsize=SUPTITLE_SIZE)
    return [save_figure(fig, figure_dir / f"lwdgh_loss_gci_{name}.png", integer_x=False)]


EXAMPLE_SCAN = 50  # Figure 5: the first 50 meta-test tasks are searched for those where MAML errs most against LWDGH
EXAMPLE_TASKS = 2  # ... and the 2 with the most such queries are drawn (the paper draws 2)
EXAMPLE_QUERIES = 10  # at most 10 query images per task


def predict_test_tasks(run: Run, count: int) -> dict:
    """The best single checkpoint of `run` (result.json's first ensemble epoch) adapted to the first `count` of the
    run's meta-test tasks, as common.Run.meta_test reads them: query images (uint8), labels, predictions, class
    names."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import importlib

    import torch

    module = importlib.import_module(str(run.config["program"]))
    fields = {f.name for f in dataclasses.fields(module.Args)}
    config = {**common.ADDED_LATER, **run.config}
    args = module.Args(**{k: v for k, v in config.items() if k in fields})
    device = common.pick_device("auto")
    args = common.for_device(args, device)
    try:
        split = common.load_split(args.dataset, "test", args.data_root, cache_dir=args.cache_dir or None,
                                  bbox_crop=args.bbox_crop, seed=args.eval_seed, verbose=False,
                                  synthetic_shape=common.synthetic_shape(args.synthetic_shape)).to(device)
    except common.DataError as e:
        raise SystemExit(f"{e} (the run's --data-root {args.data_root})")
    tasks = common.EvalTasks(split, args.ways, args.shots, args.test_queries or args.queries, args.test_tasks,
                             seed=args.eval_seed)
    tasks.index = tasks.index[:count]
    params = module.init_params(args, split.image_shape, device)
    path = run.path / f"epoch{int(run.result['ensemble_epochs'][0]):04d}.pt"
    ckpt = common.load_checkpoint(path, args)
    common.restore_params(params, ckpt["params"], path)
    state = common._to(ckpt["state"], device)
    # as the file's main meta-tests: lwdgh.py with --test-inner-steps
    predict = functools.partial(module.predict, inner_steps=args.test_inner_steps) if hasattr(
        args, "test_inner_steps") else module.predict
    predictions = torch.cat([predict(params, state, batch, args).argmax(-1).cpu()
                             for batch in tasks.batches(args.eval_batch)])  # (tasks, ways*queries)
    query = tasks.index[:, :, args.shots:].flatten(1)  # (tasks, ways*queries) image indices
    classes = torch.searchsorted(split.start.cpu(), query, right=True) - 1  # each image's class in the split
    return {"images": split.images.cpu()[query], "labels": torch.arange(args.ways).repeat_interleave(
                query.shape[1] // args.ways).expand_as(query), "predictions": predictions, "classes": classes,
            "task_classes": classes.view(len(query), args.ways, -1)[:, :, 0], "names": split.class_names,
            "epoch": int(run.result["ensemble_epochs"][0])}


def _predictions(cells: dict[tuple[str, int], Group], name: str, figure_dir: Path) -> list[Path]:
    """The LWDGH paper's Figure 5: meta-test tasks where MAML errs and MAML + LWDGH + EE does not, both models'
    predictions under each query image, the wrong ones in red. Needs both runs' checkpoints and test data."""
    found = [s for s in sorted({s for _, s in cells}) if all(
        (m, s) in cells and cells[(m, s)].runs[0].tested for m in LWDGH_PAIR)]
    if not found:
        return []
    s = found[0]
    runs = [cells[(m, s)].runs[0] for m in LWDGH_PAIR]
    try:
        maml, ours = (predict_test_tasks(run, EXAMPLE_SCAN) for run in runs)
    except (SystemExit, OSError) as e:  # no data here, a deleted checkpoint (common's messages): the report goes on
        print(f"warning: the LWDGH paper's Figure 5 for {name} not drawn: {str(e).splitlines()[0]}", file=sys.stderr)
        return []
    if not torch_equal(maml["classes"], ours["classes"]):
        print(f"warning: the LWDGH paper's Figure 5 for {name} not drawn: the two runs' meta-test tasks differ",
              file=sys.stderr)
        return []
    wrong = {k: (run["predictions"] != run["labels"])[:, :EXAMPLE_QUERIES] for k, run in (("maml", maml),
                                                                                         ("ours", ours))}
    score = (wrong["maml"].sum(1) - wrong["ours"].sum(1)).tolist()
    chosen = sorted(range(len(score)), key=lambda t: (-score[t], t))[:EXAMPLE_TASKS]
    queries = wrong["maml"].shape[1]
    fig, axes = plt.subplots(2 * len(chosen), queries, figsize=(1.3 * queries, 1.6 * 2 * len(chosen)), squeeze=False)
    for i, t in enumerate(chosen):
        for j, (label, run) in enumerate(zip(LWDGH_PAIR, (maml, ours))):
            for q in range(queries):
                ax = axes[2 * i + j][q]
                image = run["images"][t, q].permute(1, 2, 0).numpy()
                ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
                ax.set_xticks([])
                ax.set_yticks([])
                predicted = run["names"][int(run["task_classes"][t, run["predictions"][t, q]])]
                bad = bool(wrong["maml" if j == 0 else "ours"][t, q])
                ax.set_xlabel(predicted[:14], fontsize=6, color="red" if bad else "black")
                for spine in ax.spines.values():
                    spine.set_edgecolor("red" if bad else "lightgrey")
                    spine.set_linewidth(2 if bad else 0.5)
            axes[2 * i + j][0].set_ylabel(f"task {t + 1}\n{label}", fontsize=7)
    fig.suptitle(f"Meta-test predictions, {s}-shot, best single checkpoints (epochs {maml['epoch']} and "
                 f"{ours['epoch']}); wrong ones red (LWDGH paper, Figure 5)", fontsize=SUPTITLE_SIZE)
    return [save_figure(fig, figure_dir / f"lwdgh_predictions_{name}.png", integer_x=False)]


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


LWDGH_PAIR = ["MAML", "MAML + LWDGH + EE"]  # the rows of Tables 1 to 4: MAML and the full method
PAPER_004_TABLES = {  # (dataset, ways, epochs, backbone) -> the paper's tables of those runs
    ("miniimagenet", PAPER_WAYS, LWDGH_EPOCHS, "conv4"): [
        PaperTable(f"{PAPER_004_SHORT}, Table 1, the MAML rows", LWDGH_PAIR, [1, 5], PAPER_004_TABLE1)],
    ("tieredimagenet", PAPER_WAYS, LWDGH_EPOCHS, "conv4"): [
        PaperTable(f"{PAPER_004_SHORT}, Table 2, the Convnet4 rows; ours with fmu2's 64 filters", LWDGH_PAIR, [1, 5],
                   PAPER_004_TABLE2_CONV4)],
    ("tieredimagenet", PAPER_WAYS, LWDGH_EPOCHS, "resnet12"): [
        PaperTable(f"{PAPER_004_SHORT}, Table 2, the Resnet12 row", LWDGH_PAIR, [1], PAPER_004_TABLE2_RESNET12)],
    ("miniimagenet", PAPER_WAYS, LWDGH_EPOCHS, "resnet12"): [
        PaperTable(f"{PAPER_004_SHORT}, Table 3, the MAML rows", LWDGH_PAIR, [1], PAPER_004_TABLE3)],
    ("cub", PAPER_WAYS, LWDGH_EPOCHS, "conv4"): [
        PaperTable(f"{PAPER_004_SHORT}, Table 4", LWDGH_PAIR, [1, 5], PAPER_004_TABLE4)],
    ("miniimagenet", PAPER_WAYS, LWDGH_ABLATION_EPOCHS, "conv4"): [
        PaperTable(f"{PAPER_004_SHORT}, Table 5, the ablation", LWDGH_METHOD_ORDER, [1], PAPER_004_TABLE5,
                   PAPER_004_TABLE5_GCI),
        PaperTable(f"{PAPER_004_SHORT}, Table 6, the transition epoch",
                   [transition_name(*row) for row in PAPER_004_TABLE6], [1],
                   {(transition_name(*row), 1): value for row, value in PAPER_004_TABLE6.items()},
                   labels={transition_name(LWDGH_TRANSITION, LWDGH_SCHEDULE): "MAML + LWDGH + EE, E 33% cosine"})],
}

FAMILIES = [
    Family(program="cml", heading="Cooperative Meta-Learning (CML)", citation=PAPER_003,
           source="its headline result; the reference code meta-tests the single best validation model "
           "(cml.py's docstring), so the paper's number stands beside our best single model",
           table_key=lambda c: (str(c["dataset"]), int(c["ways"])),
           table_title=lambda t: f"{dataset_name(t[0])} {t[1]}-way",
           method=cml_method, order=CML_METHOD_ORDER,
           paper={(dataset, PAPER_WAYS): [PaperTable(
               PAPER_003_SHORT if dataset == "miniimagenet" else f"{PAPER_003_SHORT}'s rows; our copy gives no numbers",
               CML_METHOD_ORDER, [1, 5], PAPER_003_MINIIMAGENET if dataset == "miniimagenet" else {}, model=BEST)]
               for dataset in CML_DATASETS},
           extra_column=None, best_single=True, figure=_cml_figure),
    Family(program="lwdgh", heading="Layer-wise dynamic gradient harmonisation (LWDGH)", citation=PAPER_004,
           source="its Tables 1 to 6; GCI = the mean over epochs of metrics.csv's gci_mean",
           table_key=lambda c: (str(c["dataset"]), int(c["ways"]), int(c["epochs"]), str(c.get("backbone", "conv4"))),
           table_title=lambda t: f"{dataset_name(t[0])} {t[1]}-way, {BACKBONES.get(t[3], t[3])}, {t[2]} epochs",
           method=lwdgh_method, order=LWDGH_METHOD_ORDER, paper=PAPER_004_TABLES,
           extra_column=LWDGH_GCI, best_single=False, figure=_lwdgh_figure),
]

# ---- Other runs and the list of run directories ---------------------------------------------------------


def other_section(groups: list[Group], shown: set[int]) -> str:
    """Groups no table shows: another program, or a second configuration of a table's cell."""
    others = [g for g in groups if id(g) not in shown]
    if not others:
        return ""
    lines = []
    for group in others:
        c = group.config
        setting = (f"{c.get('ways')}w{c.get('shots')}s t{c.get('tasks')}, "
                   f"{c.get('epochs')} × {c.get('iters_per_epoch')} it")
        if "inner_lr" in c:
            setting += f", inner lr {lr_text(c['inner_lr'])}"
        best = [run.max_val() for run in group.runs]
        best_text = ", ".join(f"{PERCENT * b[0]:.2f} ep {b[1]}" for b in best if b) or NONE
        lines.append([str(c.get("algorithm")), dataset_name(str(c.get("dataset"))), setting, best_text,
                      accuracy_text(group), ", ".join(str(run.path) for run in group.runs)])
    return "\n".join(["## Other runs", "", "Runs that no table above shows (another program, or a second "
                      "configuration of a cell: each table shows the configuration with the most finished runs).", "",
                      markdown_table(["algorithm", "dataset", "setting", "max val (%) at epoch", "test (%)", "runs"],
                                     lines), ""])


def runs_section(runs: list[Run]) -> str:
    """Every run directory with its status and numbers."""
    lines = []
    for run in runs:
        best = run.max_val()
        r = run.result or {}
        test = (f"{PERCENT * r['test_acc_ensemble']:.2f} ± {PERCENT * r['test_ci_ensemble']:.2f}" if run.tested
                else NONE)
        single = (f"{PERCENT * r['test_acc_best']:.2f} ± {PERCENT * r['test_ci_best']:.2f}"
                  if r.get("test_acc_best") is not None else NONE)
        lines.append([str(run.path), str(run.config.get("algorithm")), str(run.config.get("seed")), run.status,
                      run.progress().removeprefix("epoch "),
                      f"{PERCENT * best[0]:.2f} at {best[1]}" if best else NONE, test, single])
    return "\n".join(["## Run directories", "",
                      markdown_table(["run", "algorithm", "seed", "status", "epochs", "max val (%)",
                                      "test, ensemble (%)", "test, best single (%)"], lines), ""])


# ---- The report ---------------------------------------------------------------------------------------


def write_report(roots: list[Path], out: Path, name: str, exclude: list[str] = (), only_found: bool = False,
                 title: str | None = None) -> Path:
    """Write out/<name>.md and its figures out/<name>/*.png (older PNGs there are removed); return the .md path."""
    runs = [run for run in find_runs(roots, exclude)  # regression runs: tools/sinusoid_report.py's
            if run.config.get("dataset") not in common.REGRESSION]
    groups = group_runs(runs)
    figure_dir = out / name
    figure_dir.mkdir(parents=True, exist_ok=True)
    for old in figure_dir.glob("*.png"):
        old.unlink()
    where = ", ".join(str(r) for r in roots) + (f" (excluding {', '.join(exclude)})" if exclude else "")
    finished = sum(run.result is not None for run in runs)
    if runs:
        summary = (f"Generated by `tools/report.py` from {len(runs)} run directories under {where}: {finished} with "
                   f"a result.json, {len(runs) - finished} unfinished. Accuracies in %, one seed unless a cell says "
                   "otherwise.")
    else:
        print(f"no runs under {where}: no folder there holds a config.json", file=sys.stderr)
        summary = f"Generated by `tools/report.py`: no runs under {where} (no folder there holds a config.json)."
    parts = [f"# {title or 'Reproduction report'}", summary]
    provenance = {key: sorted({str(run.config.get(key, "not recorded")) for run in runs})
                  for key in ("machine", "commit")}
    if runs:  # config.json records both (common.provenance); older runs may not
        parts.append(f"Runs made on: {'; '.join(provenance['machine'])}. At commit: {', '.join(provenance['commit'])} "
                     f"(torch {', '.join(sorted({str(run.config.get('torch', '?')) for run in runs}))}).")
    text, shown = gs_section(gs_cells(groups), only_found, figure_dir, name)
    parts.append(text)
    for family in FAMILIES:
        text, more = method_section(family, groups, only_found, figure_dir, name)
        parts.append(text)
        shown |= more
    parts += [other_section(groups, shown), runs_section(runs) if runs else "No run directories found."]
    path = out / f"{name}.md"
    path.write_text("\n\n".join(part.strip("\n") for part in parts if part.strip()) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--runs", nargs="+", type=Path, default=[Path("runs")],
                        help="folders searched (recursively) for run directories (default: runs)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: results)")
    parser.add_argument("--name", default="report",
                        help="writes OUT/NAME.md and the figures OUT/NAME/*.png (default: report)")
    parser.add_argument("--exclude", nargs="*", default=[],
                        help="paths relative to a --runs folder to skip, e.g. quick demo")
    parser.add_argument("--only-found", action="store_true",
                        help="show only the runs found: no 'not yet run' rows for the papers' grids")
    parser.add_argument("--title", help="the report's title")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:
        print(f"warning: no such folder: {', '.join(missing)}", file=sys.stderr)
    path = write_report(args.runs, args.out, args.name, args.exclude, args.only_found,
                        args.title)
    print(f"wrote {path} and its figures in {args.out / args.name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

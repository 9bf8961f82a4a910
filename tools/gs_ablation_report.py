"""results/gs_ablation.md: gradient sharing taken apart (`make gs-ablation`), paired seeds on full Omniglot.

    python tools/gs_ablation_report.py --runs runs/gs-ablation --out results

Run directories maml_{og,gs,gs_batch,gs_history}__<name>__t<task batch>__<seed>: per seed the runs share θ's
initialisation, their training tasks and (--eval-seed) their validation and test tasks, so each difference is
paired. Per run: the mean validation accuracy over the first third of the epochs (the early curve, where O. Chang
and H. Lipson, "Accelerating Meta-Learning by Sharing Gradients", arXiv 2312.08398, claim GS helps), the epoch of
the best validation accuracy, the meta-test accuracy (top-5 ensemble). Across seeds: the mean difference with its
95% t-interval, claim by claim:
  1. at task batch 5, which share helps: both (the paper), the batch's g_k alone, the earlier batches' mean alone,
     each against OG, and both against each alone;
  2. the paper's "more pronounced at task batch 5 than 1", extended to 10 and 20: both − OG per task batch, with
     the same meta-iterations (so a run sees meta-iterations × T tasks).
Figures: validation curves of the four at task batch 5; σ(λ) (and σ(m), both only) per epoch, mean over seeds.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (its run reader)
from omniglot_report import PERCENT, early_mean, interval, verdict  # noqa: E402

NAME = re.compile(r"maml_(og|gs|gs_batch|gs_history)__(.+)__t(\d+)__(\d+)$")
SIDES = {"og": "OG", "gs": "both", "gs_batch": "batch", "gs_history": "history"}  # run name -> --gs-source
SOURCES_BATCH = 5  # the task batch of the sources' comparison
COLORS = {"og": "tab:blue", "gs": "tab:orange", "gs_batch": "tab:green", "gs_history": "tab:red"}
METRICS = {"early mean val acc (%)": lambda run: PERCENT * early_mean(run),
           "best val epoch": lambda run: float(run.max_val()[1]),
           "test acc (%)": lambda run: PERCENT * run.result["test_acc_ensemble"]}


def find(root: Path) -> dict[int, dict[int, dict[str, report.Run]]]:
    """{task batch: {seed: {side: finished run}}}."""
    runs: dict[int, dict[int, dict[str, report.Run]]] = {}
    for run in report.find_runs([root]):
        if (m := NAME.search(run.path.name)) and run.result is not None and run.result.get("test_acc_ensemble"):
            runs.setdefault(int(m.group(3)), {}).setdefault(int(m.group(4)), {})[m.group(1)] = run
    return runs


def shown(mean: float, half: float) -> str:
    """mean ± half, or the mean alone with one seed (no interval); no runs: said so."""
    if mean != mean:
        return "no runs"
    return f"{mean:+.2f} ± {half:.2f}" if half == half else f"{mean:+.2f} (one seed)"


def paired(seeds: dict[int, dict[str, report.Run]], a: str, b: str, metric) -> tuple[float, float, int]:
    """Mean of metric(a) − metric(b) over the seeds that have both, its 95% half-width, and their count."""
    both = [s for s in seeds.values() if a in s and b in s]
    if not both:
        return float("nan"), float("nan"), 0
    return (*interval([metric(s[a]) - metric(s[b]) for s in both]), len(both))


def sources_section(seeds: dict[int, dict[str, report.Run]], figure_dir: Path) -> list[str]:
    lines = [f"## 1. Which share helps? Task batch {SOURCES_BATCH}", "",
             "| comparison | seeds | " + " | ".join(METRICS) + " |", "| --- | --- |" + " --- |" * len(METRICS)]
    claims = []
    for a, b in (("gs", "og"), ("gs_batch", "og"), ("gs_history", "og"), ("gs", "gs_batch"), ("gs", "gs_history")):
        cells, count = [], 0
        for name, metric in METRICS.items():
            mean, half, count = paired(seeds, a, b, metric)
            cells.append(shown(mean, half))
            if name.startswith("early"):
                claims.append(f"- {SIDES[a]} higher early than {SIDES[b]}: " + (
                    f"{shown(mean, half)} points: {verdict(mean, half, higher_is_claim=True)}" if count else "no runs"))
        lines.append(f"| {SIDES[a]} − {SIDES[b]} | {count} | " + " | ".join(cells) + " |")
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.6))
    for side, color in COLORS.items():
        have = [s[side] for s in seeds.values() if side in s]
        if not have:
            continue
        curves = np.array([[PERCENT * v for v in run.column("val_acc")] for run in have])
        axes[0].plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), color=color,
                     label=f"{SIDES[side]} ({len(have)} seeds)")
        for column, style in (("sigma_lambda", "-"), ("sigma_m", "--")):
            values = np.array([run.column(column) for run in have], dtype=float)
            if side != "og" and not np.isnan(values).all():
                axes[1].plot(np.arange(1, values.shape[1] + 1), np.nanmean(values, 0), style, color=color,
                             label=f"{SIDES[side]}: {'σ(λ)' if column == 'sigma_lambda' else 'σ(m)'}")
    axes[0].set(title="validation accuracy, mean over seeds", xlabel="epoch", ylabel="accuracy (%)")
    axes[1].set(title="σ(λ) (solid) and σ(m) (dashed), mean over k and seeds", xlabel="epoch")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figure_dir / "sources.png", dpi=110)
    plt.close(fig)
    gates = ["", "The gates each mode learned (σ(λ_k), σ(m_k): mean over k and seeds; m exists in `both` only):", "",
             "| mode | σ(λ) after epoch 1 | σ(λ) at the end | σ(m) after epoch 1 | σ(m) at the end |",
             "| --- | --- | --- | --- | --- |"]
    for side in ("gs", "gs_batch", "gs_history"):
        have = [s[side] for s in seeds.values() if side in s]
        cells = []
        for column in ("sigma_lambda", "sigma_m"):
            values = np.array([run.column(column) for run in have], dtype=float) if have else np.full((1, 1), np.nan)
            first, last = (np.nanmean(values[:, i]) if not np.isnan(values[:, i]).all() else np.nan for i in (0, -1))
            cells += ["—" if v != v else f"{v:.3f}" for v in (first, last)]
        gates.append(f"| {SIDES[side]} | " + " | ".join(cells) + " |")
    return lines + gates + ["", "![curves and gates](gs_ablation/sources.png)", "", "Claim by claim:", "", *claims,
                            ""]


def task_batch_section(runs: dict[int, dict[int, dict[str, report.Run]]]) -> list[str]:
    lines = ["## 2. Does the gain grow with the task batch? OG against both", "",
             "| task batch | tasks seen | seeds | " + " | ".join(METRICS) + " |",
             "| --- | --- | --- |" + " --- |" * len(METRICS)]
    early = {}
    for tasks in sorted(runs):
        seeds = runs[tasks]
        run = next(s["og"] for s in seeds.values() if "og" in s)
        seen = tasks * int(run.config["epochs"]) * int(run.config["iters_per_epoch"])
        cells, count = [], 0
        for name, metric in METRICS.items():
            mean, half, count = paired(seeds, "gs", "og", metric)
            cells.append(shown(mean, half))
            if name.startswith("early"):
                early[tasks] = (mean, half)
        lines.append(f"| {tasks} | {seen:,} | {count} | " + " | ".join(cells) + " |")
    lines += ["", "Claim by claim (both − OG, early mean validation accuracy):", ""]
    lines += [f"- task batch {t}: {shown(m, h)} points: {verdict(m, h, higher_is_claim=True)}" if m == m
              else f"- task batch {t}: no paired runs" for t, (m, h) in early.items()]
    order = [early[t][0] for t in sorted(early)]
    grows = all(b > a for a, b in zip(order, order[1:]))
    lines.append(f"- the gain grows with the task batch ({', '.join(f'{m:+.2f}' for m in order)} at "
                 f"{', '.join(map(str, sorted(early)))}): {'so, in the means' if grows else 'not so, in the means'}"
                 "; compare the intervals above")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--runs", type=Path, default=Path("runs/gs-ablation"), help="the folder of the runs")
    parser.add_argument("--out", type=Path, default=Path("results"), help="writes OUT/gs_ablation.md, its figures")
    args = parser.parse_args(argv)
    runs = find(args.runs)
    if not runs:
        print(f"error: no finished runs maml_<og|gs|gs_batch|gs_history>__<name>__t<T>__<seed> under {args.runs}; "
              "run make gs-ablation first", file=sys.stderr)
        return 1
    figure_dir = args.out / "gs_ablation"
    figure_dir.mkdir(parents=True, exist_ok=True)
    c = next(iter(next(iter(next(iter(runs.values())).values())).values())).config
    lines = ["# Gradient sharing taken apart: the batch's share, the history's share, and the task batch", "",
             f"Runs under `{args.runs}`: MAML, {c['dataset']} {c['ways']}-way {c['shots']}-shot, {c['filters']} "
             f"filters, {c['inner_steps']} inner steps at {c['inner_lr']}, {c['epochs']} epochs × "
             f"{c['iters_per_epoch']} meta-iterations; differences in percentage points (epochs for the best "
             "epoch), mean over paired seeds ± the half-width of the 95% t-interval.", ""]
    every = [run for seeds in runs.values() for sides in seeds.values() for run in sides.values()]
    started = min((run.path / "config.json").stat().st_mtime for run in every)
    ended = max((run.path / "result.json").stat().st_mtime for run in every)
    lines += [f"{len(every)} finished runs, written over {(ended - started) / 60:.0f} minutes of wall time (the first "
              "config.json to the last result.json; the meta-test included).", ""]
    if SOURCES_BATCH in runs:
        lines += sources_section(runs[SOURCES_BATCH], figure_dir)
    lines += task_batch_section(runs)
    (args.out / "gs_ablation.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'gs_ablation.md'} and {figure_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

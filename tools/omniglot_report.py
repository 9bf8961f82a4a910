"""results/omniglot.md: the CPU check on full Omniglot and the multi-seed test of gradient sharing's speed-up.

    python tools/omniglot_report.py --check runs/omniglot-check --study runs/gs-study --out results

--check: one run directory (`make omniglot-check`): its validation curve, its meta-test (top-5 ensemble and
best single checkpoint) beside the published MAML 98.7 ± 0.4% (Finn et al. 2017, Table 1, 5-way 1-shot) and
MAML++ 99.47% (Antoniou et al. 2019, the number issue 22 quotes), the meta-iterations run against the papers'.
--study: run directories maml_{og,gs}__<name>__t<task batch>__<seed> (`make gs-study`): per task batch and seed
a pair OG/GS on the same validation and test tasks; per pair the mean validation accuracy over the first third
of the epochs (the area under the early curve), the epoch of the best validation accuracy, the meta-test
accuracy; across seeds the mean difference GS − OG with its 95% t-interval (paired), and a figure of the mean ±
sd curves over seeds. The claims of O. Chang and H. Lipson, "Accelerating Meta-Learning by Sharing Gradients"
(arXiv 2312.08398), each against those intervals: GS is higher early in meta-training, more so at task batch 5
than 1, and reaches its best validation accuracy in fewer epochs.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (its run reader)

PERCENT = 100.0
CONFIDENCE = 0.95
EARLY = 1 / 3  # the first third of the epochs: Chang & Lipson's (arXiv 2312.08398) "early in meta-training"
LATE = 0.9  # best epochs all this late: still rising, the best-epoch comparison is censored
PUBLISHED = {"MAML, Finn et al. 2017 (arXiv 1703.03400), Table 1, Omniglot 5-way 1-shot": "98.7 ± 0.4",
             "MAML++, Antoniou et al. 2019 (arXiv 1810.09502), Omniglot 5-way 1-shot (as issue 22 quotes it)": "99.47"}
PAPER_ITERATIONS = "50,000-60,000"  # Finn et al. 60,000 meta-iterations; the MAML++ reference 100 x 500 = 50,000
STUDY_NAME = re.compile(r"maml_(og|gs)__(.+)__t(\d+)__(\d+)$")


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval (0 for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, float(stats.t.ppf((1 + CONFIDENCE) / 2, len(values) - 1) * statistics.stdev(values)
                       / len(values) ** 0.5)


def early_mean(run: report.Run) -> float:
    """Mean validation accuracy over the first third of the epochs (at least one)."""
    val = [v for v in run.column("val_acc")]
    return statistics.fmean(val[:max(1, round(EARLY * len(val)))])


def check_section(path: Path, figure_dir: Path) -> list[str]:
    run = report.read_run(path)
    c, r = run.config, run.result or {}
    iterations = int(c["epochs"]) * int(c["iters_per_epoch"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = [e * int(c["iters_per_epoch"]) for e in run.column("epoch")]
    ax.plot(epochs, [PERCENT * v for v in run.column("val_acc")], marker=".")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"validation accuracy (%), {c['val_tasks']} tasks")
    ax.set_title(f"MAML (--no-gs), full Omniglot {c['ways']}-way {c['shots']}-shot, task batch {c['tasks']}")
    fig.tight_layout()
    fig.savefig(figure_dir / "check_validation.png", dpi=110)
    plt.close(fig)
    rows = [f"| {int(e)} | {PERCENT * v:.2f} ± {PERCENT * ci:.2f} |"
            for e, v, ci in zip(epochs, run.column("val_acc"), run.column("val_ci"))]
    hours = sum(run.column("seconds")) / 3600
    lines = ["## 1. The CPU check: MAML on full Omniglot, 5-way 1-shot", "",
             f"Run: `{path}` ({run.status}), {iterations:,} meta-iterations ({c['epochs']} epochs of "
             f"{c['iters_per_epoch']}) in {hours:.2f} h of training on {c.get('machine', 'not recorded')}, "
             f"commit {c.get('commit', 'not recorded')}; the papers train {PAPER_ITERATIONS}.",
             f"Protocol: the MAML++ reference's Omniglot configs, cut (chosen over Finn et al.'s in a brief "
             f"comparison, docs/reproducing.md): task batch {c['tasks']}, {c['inner_steps']} inner steps at "
             f"{c['inner_lr']}, {c['filters']} filters, queries per class: {c['queries']}, second order, "
             "Vinyals' split.",
             "",
             "| | meta-test accuracy (%) |", "| --- | --- |"]
    if r.get("test_acc_ensemble") is not None:
        lines += [f"| ours, top-5 ensemble, {r['test_tasks']} tasks | {PERCENT * r['test_acc_ensemble']:.2f} ± "
                  f"{PERCENT * r['test_ci_ensemble']:.2f} |",
                  f"| ours, best single checkpoint (epoch {r['ensemble_epochs'][0]}) | "
                  f"{PERCENT * r['test_acc_best']:.2f} ± {PERCENT * r['test_ci_best']:.2f} |"]
    lines += [f"| {name} | {value} |" for name, value in PUBLISHED.items()]
    lines += ["", "![validation curve](omniglot/check_validation.png)", "",
              "| meta-iteration | validation accuracy (%) |", "| --- | --- |", *rows, ""]
    return lines


def study_section(root: Path, figure_dir: Path) -> list[str]:
    pairs: dict[int, dict[int, dict[str, report.Run]]] = {}
    for run in report.find_runs([root]):
        m = STUDY_NAME.search(run.path.name)
        if m and run.result is not None:
            pairs.setdefault(int(m.group(3)), {}).setdefault(int(m.group(4)), {})[m.group(1)] = run
    lines = ["## 2. Does gradient sharing accelerate meta-training? Paired seeds on full Omniglot", ""]
    if not pairs:
        return lines + ["No finished study runs found.", ""]
    any_run = next(iter(next(iter(pairs.values())).values()))["og"]
    c = any_run.config
    lines += [f"Runs under `{root}`: MAML OG (`--no-gs`) and GS (`--gs`), {c['ways']}-way {c['shots']}-shot, "
              f"{c['filters']} filters, {c['inner_steps']} inner steps at {c['inner_lr']}, {c['queries']} queries "
              f"per class; each pair shares its seed, hence its initial θ, its training tasks and (--eval-seed) "
              f"its {c['val_tasks']} validation and {c['test_tasks']} test tasks. Differences GS − OG in "
              f"percentage points, mean over seeds ± the half-width of the 95% t-interval (paired).", "",
              "| task batch | seeds | epochs × iterations | early mean val acc: OG, GS, GS − OG | "
              "best val epoch: OG, GS, GS − OG | test acc: OG, GS, GS − OG |", "| --- | --- | --- | --- | --- | --- |"]
    summary, best = {}, {}
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 3.6), squeeze=False)
    for ax, (tasks, seeds) in zip(axes[0], sorted(pairs.items(), reverse=True)):
        complete = {s: p for s, p in sorted(seeds.items()) if {"og", "gs"} <= set(p)}
        metrics = {"early": lambda run: PERCENT * early_mean(run), "best": lambda run: float(run.max_val()[1]),
                   "test": lambda run: PERCENT * run.result["test_acc_ensemble"]}
        cells = []
        for name, value in metrics.items():
            og = [value(p["og"]) for p in complete.values()]
            gs = [value(p["gs"]) for p in complete.values()]
            diff = interval([g - o for g, o in zip(gs, og)])
            summary[(tasks, name)] = diff
            cells.append(f"{statistics.fmean(og):.2f}, {statistics.fmean(gs):.2f}, {diff[0]:+.2f} ± {diff[1]:.2f}")
        best[tasks] = [float(p[side].max_val()[1]) for p in complete.values() for side in ("og", "gs")]
        run = next(iter(complete.values()))["og"]
        lines.append(f"| {tasks} | {len(complete)} | {run.config['epochs']} × {run.config['iters_per_epoch']} | "
                     + " | ".join(cells) + " |")
        for side, color in (("og", "tab:blue"), ("gs", "tab:orange")):
            curves = np.array([[PERCENT * v for v in p[side].column("val_acc")] for p in complete.values()])
            mean, sd = curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1])
            epochs = np.arange(1, curves.shape[1] + 1)
            ax.plot(epochs, mean, color=color, label=f"{side.upper()}: mean of {len(curves)} seeds")
            ax.fill_between(epochs, mean - sd, mean + sd, color=color, alpha=0.2, linewidth=0)
        ax.axvline(max(1, round(EARLY * len(epochs))), color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"task batch {tasks}: validation accuracy, mean ± sd", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figure_dir / "gs_study.png", dpi=110)
    plt.close(fig)
    lines += ["", "![mean ± sd validation curves](omniglot/gs_study.png)", "", "Claim by claim:", ""]
    for tasks in sorted(pairs, reverse=True):
        mean, half = summary[(tasks, "early")]
        lines.append(f"- GS higher early (task batch {tasks}): {mean:+.2f} ± {half:.2f} points: "
                     + verdict(mean, half, higher_is_claim=True))
        mean, half = summary[(tasks, "best")]
        lines.append(f"- best validation accuracy in fewer epochs (task batch {tasks}): {mean:+.2f} ± {half:.2f} "
                     "epochs: " + verdict(mean, half, higher_is_claim=False))
        epochs = int(next(iter(pairs[tasks].values()))["og"].config["epochs"])
        if min(best[tasks]) >= LATE * epochs:
            lines.append(f"  (every run's best epoch is at least {LATE:.0%} of its {epochs}: the curves still rise at "
                         "the end, so at this budget the best epoch is censored and this claim cannot be tested)")
    if len(pairs) == 2:
        (big, small) = sorted(pairs, reverse=True)
        gap = summary[(big, "early")][0] - summary[(small, "early")][0]
        lines.append(f"- more so at task batch {big} than {small}: the early gains differ by {gap:+.2f} points "
                     f"({'in the claimed direction' if gap > 0 else 'against the claim'}; compare their intervals "
                     "above)")
    return lines + [""]


def verdict(mean: float, half: float, higher_is_claim: bool) -> str:
    """Whether a paired interval supports a claim that the difference is > 0 (or < 0)."""
    if half != half:  # one seed: no interval
        return "one seed, no interval: not tested"
    low, high = mean - half, mean + half
    if (low > 0) if higher_is_claim else (high < 0):
        return "supported (the interval excludes 0)"
    if (high < 0) if higher_is_claim else (low > 0):
        return "contradicted (the interval excludes 0, on the other side)"
    return "not supported: the interval includes 0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--check", type=Path, help="the run directory of `make omniglot-check`")
    parser.add_argument("--study", type=Path, help="the folder of `make gs-study`'s runs")
    parser.add_argument("--out", type=Path, default=Path("results"), help="writes OUT/omniglot.md, OUT/omniglot/")
    parser.add_argument("--command", default="", help="the command lines that made the runs, quoted in the file")
    args = parser.parse_args(argv)
    figure_dir = args.out / "omniglot"
    figure_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Full Omniglot: a CPU check against the published numbers, and a paired test of gradient sharing", ""]
    if args.command:
        lines += ["Made by:", "", "```", *args.command.split(";"), "```", ""]
    if args.check:
        lines += check_section(args.check, figure_dir)
    if args.study:
        lines += study_section(args.study, figure_dir)
    (args.out / "omniglot.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'omniglot.md'} and {figure_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

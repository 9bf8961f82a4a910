"""results/sinusoid.md: few-shot sinusoid regression (`make reproduce-sinusoid`) beside the published numbers.

    python tools/sinusoid_report.py --runs runs/sinusoid --out results

Run directories <method>__sinusoid__k<K>__<seed>, method one of maml_og, maml_gs, metasgd_og, metasgd_gs, cml_maml
(MAML + CML; `cml.py --gamma 0` is maml_og, tested bitwise), each trained and meta-tested at its own K (support
points = query points = K). Per row: the meta-test MSE of the best validation checkpoint (the published numbers are
single models) and of the top-5 ensemble (the members' predictions averaged), each the mean over the seeds with the
95% interval over the test tasks (one seed) or the t-interval over the seeds' values (several). Figure: the MSE after
k = 0..10 inner steps at the training α on the test tasks (C. Finn, P. Abbeel and S. Levine, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks", arXiv 1703.03400, Figure 3 in its v3), by the best checkpoint
of each method without gradient sharing (gradient sharing meta-learns one m_k, λ_k per training step only), and of
MAML trained at K = 10 tested at K = 5, Finn et al.'s setting.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import report  # noqa: E402  (its run reader)
from omniglot_report import interval  # noqa: E402

NAME = re.compile(r"(maml_og|maml_gs|metasgd_og|metasgd_gs|cml_maml)__sinusoid__k(\d+)__(\d+)$")
METHODS = {"maml_og": "MAML", "maml_gs": "MAML + GS", "metasgd_og": "Meta-SGD", "metasgd_gs": "Meta-SGD + GS",
           "cml_maml": "MAML + CML"}
CURVES = ("maml_og", "metasgd_og", "cml_maml")  # step-independent inner updates: any number of steps is defined
CURVE_STEPS = 10  # Finn et al.'s Figure 3: up to 10 gradient steps at meta-test
DIVERGED = 1e3  # an MSE beyond it (the targets' variance is about 4): the steps overshot, shown as "diverged"
PLOT_TOP = 10.0  # the figure's MSE axis ends here (diverging curves leave it)
FINN_SHOTS, FINN_TRAIN_SHOTS = 5, 10  # their Table 2 is 5-shot; Section 5.1 trains MAML with K = 10
# C. Finn, P. Abbeel, S. Levine, arXiv 1703.03400 v3, Appendix C, Table 2 ("showing 5-shot mean squared error"):
# MAML's MSE after 1, 5 and 10 gradient steps; and "pretrain on all tasks", the best of its baselines.
FINN_TABLE2 = {"MAML (ours)": {1: 0.67, 5: 0.38, 10: 0.35}, "pretrain on all tasks": {1: 2.41, 5: 2.23, 10: 2.19}}
LI_TABLE1 = ("Z. Li, F. Zhou, F. Chen and H. Li, \"Meta-SGD: Learning to Learn Quickly for Few-Shot Learning\", "
             "arXiv 1707.09835, Table 1 (MAML and Meta-SGD at 5, 10 and 20 shots): not transcribed here; no copy of "
             "the paper's text was reachable from the machine that wrote this report, and no number is written "
             "from memory. Its rows belong beside ours in the table below.")


def find(root: Path) -> dict[tuple[str, int], dict[int, report.Run]]:
    """{(method, K): {seed: finished run}}."""
    runs: dict[tuple[str, int], dict[int, report.Run]] = {}
    for run in report.find_runs([root]):
        if (m := NAME.search(run.path.name)) and run.result and run.result.get("test_mse_best") is not None:
            runs.setdefault((m.group(1), int(m.group(2))), {})[int(m.group(3))] = run
    return runs


def cell(seeds: dict[int, report.Run], key: str) -> str:
    """Mean over the seeds ± the 95% interval: over the test tasks (one seed), over the seeds (several)."""
    values = [run.result[f"test_mse_{key}"] for run in seeds.values()]
    if len(values) == 1:
        run = next(iter(seeds.values()))
        return f"{values[0]:.3f} ± {run.result[f'test_ci_{key}']:.3f}"
    mean, half = interval(values)
    return f"{mean:.3f} ± {half:.3f} ({len(values)} seeds)"


def load_model(run: report.Run):
    """The run's algorithm file, its Args and its best checkpoint (params, state), on the CPU."""
    module = importlib.import_module(run.config["program"])
    fields = {f.name for f in dataclasses.fields(module.Args)}
    args = module.Args(**{name: value for name, value in run.config.items() if name in fields})
    args = common.for_device(dataclasses.replace(args, device="cpu"), torch.device("cpu"))
    path = run.path / f"epoch{run.result['ensemble_epochs'][0]:04d}.pt"
    ckpt = common.load_checkpoint(path)
    return module, args, ckpt["params"], ckpt["state"]


def mse_curve(run: report.Run, shots: int) -> list[float]:
    """The best checkpoint's meta-test MSE after 0..CURVE_STEPS inner steps on the run's test tasks, drawn at `shots`
    support and query points (the run's --eval-seed: the same tasks for every run)."""
    module, args, params, state = load_model(run)
    tasks = common.SinusoidEvalTasks("test", shots, shots, args.test_tasks, args.eval_seed, "cpu")
    curve = []
    for steps in range(CURVE_STEPS + 1):
        at = dataclasses.replace(args, inner_steps=steps)
        def predict(batch, at=at):
            return module.predict(params, state, batch, at)
        curve.append(float(common.evaluate([predict], tasks, args.eval_batch)[0].mean()))
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--runs", type=Path, default=Path("runs/sinusoid"), help="the folder of the runs")
    parser.add_argument("--out", type=Path, default=Path("results"), help="writes OUT/sinusoid.md, its figure")
    args = parser.parse_args(argv)
    runs = find(args.runs)
    if not runs:
        print(f"error: no finished runs <method>__sinusoid__k<K>__<seed> under {args.runs}; run make "
              f"reproduce-sinusoid first", file=sys.stderr)
        return 1
    figure_dir = args.out / "sinusoid"
    figure_dir.mkdir(parents=True, exist_ok=True)
    shots = sorted({k for _, k in runs})
    c = next(iter(next(iter(runs.values())).values())).config
    lines = ["# Few-shot sinusoid regression", "",
             f"Runs under `{args.runs}`: {c['tasks']} tasks per meta-iteration, {c['inner_steps']} inner step(s) at "
             f"α = {c['inner_lr']}, Adam at {c['outer_lr']}, {c['epochs']} epochs × {c['iters_per_epoch']} "
             f"meta-iterations; K support and K query points per task; {c['test_tasks']} test tasks. Mean squared "
             "error on the test tasks' query points (lower is better), ± its 95% interval.", "",
             "| method | " + " | ".join(f"K = {k}: best | K = {k}: ensemble" for k in shots) + " |",
             "| --- |" + " --- | --- |" * len(shots)]
    for method, label in METHODS.items():
        if any((method, k) in runs for k in shots):
            lines.append(f"| {label} | " + " | ".join(
                f"{cell(runs[method, k], 'best')} | {cell(runs[method, k], 'ensemble')}" if (method, k) in runs
                else "not run | not run" for k in shots) + " |")
    lines += ["", "## Published", "", f"- {LI_TABLE1}",
              "- C. Finn, P. Abbeel and S. Levine, arXiv 1703.03400 (v3), Appendix C, Table 2, 5-shot MSE after 1 / "
              "5 / 10 gradient steps: "
              + "; ".join(f"{name} {v[1]} / {v[5]} / {v[10]}" for name, v in FINN_TABLE2.items())
              + f". Section 5.1 trains MAML with K = {FINN_TRAIN_SHOTS}; the table does not say at which K its "
              "MAML was trained, so both of ours are below.", ""]
    curves: dict[str, list[float]] = {}
    for method in CURVES:
        for k in shots:
            if (method, k) in runs:
                curves[f"{METHODS[method]}, K = {k}"] = mse_curve(min(runs[method, k].items())[1], k)
    if ("maml_og", FINN_TRAIN_SHOTS) in runs:
        finn = min(runs["maml_og", FINN_TRAIN_SHOTS].items())[1]
        curves[f"MAML trained at K = {FINN_TRAIN_SHOTS}, tested at K = {FINN_SHOTS}"] = mse_curve(finn, FINN_SHOTS)
    if curves:
        lines += [f"## MSE after k inner steps at meta-test (seed {min(next(iter(runs.values())))}, the best "
                  "checkpoint)", "", "| model | " + " | ".join(f"k = {k}" for k in range(CURVE_STEPS + 1)) + " |",
                  "| --- |" + " --- |" * (CURVE_STEPS + 1)]
        lines += [f"| {name} | " + " | ".join(f"{v:.3f}" if v < DIVERGED else "diverged" for v in curve) + " |"
                  for name, curve in curves.items()]
        lines += ["", f"diverged: an MSE above {DIVERGED:g}, inf or NaN. Such a model was meta-trained for one step; "
                  "its learned step (Meta-SGD's α, MAML's weights) overshoots when repeated at the training α."]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for name, curve in curves.items():
            ax.plot(range(CURVE_STEPS + 1), curve, marker="o", markersize=3, label=name)
        ax.plot(sorted(FINN_TABLE2["MAML (ours)"]), [FINN_TABLE2["MAML (ours)"][k] for k in
                                                     sorted(FINN_TABLE2["MAML (ours)"])],
                "k*", label="MAML, Finn et al. Table 2 (5-shot)")
        ax.set(xlabel="inner steps at meta-test", ylabel="test MSE", yscale="log", ylim=(None, PLOT_TOP))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(figure_dir / "mse_by_steps.png", dpi=110)
        plt.close(fig)
        lines += ["", "![MSE after k steps](sinusoid/mse_by_steps.png)", ""]
    (args.out / "sinusoid.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'sinusoid.md'} and {figure_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

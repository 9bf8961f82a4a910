"""Print runs side by side: validation accuracy (sinusoid: MSE) per epoch, then the meta-test results.

    python tools/compare.py runs/demo/maml runs/demo/maml_gs

A column is headed by its run directory's name (the whole path where two names are alike), as two runs of one
algorithm file (e.g. maml_gs.py with --gs and with --no-gs) record the same algorithm name.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def load(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """(config.json, metrics.csv rows, result.json) of a run directory."""
    for name in ("config.json", "metrics.csv", "result.json"):
        if not (run_dir / name).is_file():
            raise SystemExit(f"error: {run_dir / name} not found: is {run_dir} a finished run directory?")
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return json.loads((run_dir / "config.json").read_text()), rows, json.loads((run_dir / "result.json").read_text())


REGRESSION = ("sinusoid",)  # common.REGRESSION: scored by MSE (this tool reads files only, without torch)


def percent(value) -> str:
    return "-" if value in (None, "") else f"{100 * float(value):.2f}"


def mse(value) -> str:
    return "-" if value in (None, "") else f"{float(value):.4f}"


def labels(run_dirs: list[Path]) -> list[str]:
    """Distinct column headers: each run directory's name, or its whole path where names repeat."""
    names = [run_dir.name or str(run_dir) for run_dir in run_dirs]
    return [name if names.count(name) == 1 else str(run_dir) for name, run_dir in zip(names, run_dirs)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    run_dirs = parser.parse_args(argv).runs
    runs = [load(run_dir) for run_dir in run_dirs]
    regression = {config.get("dataset") in REGRESSION for config, _, _ in runs}
    if len(regression) > 1:
        raise SystemExit("error: these runs mix classification (accuracy) and regression (MSE); compare each kind "
                         "apart")
    key, best, show, what = ("mse", "min", mse, "MSE") if regression.pop() else ("acc", "max", percent, "accuracy (%)")
    names = labels(run_dirs)
    width = max(12, *(len(n) + 1 for n in names))  # a space at least between columns
    print(f"meta-validation {what} per epoch")
    print("epoch " + "".join(f"{n:>{width}}" for n in names))
    for epoch in range(max(len(rows) for _, rows, _ in runs)):
        cells = [f"{show(rows[epoch][f'val_{key}']):>{width}}" if epoch < len(rows) else " " * width
                 for _, rows, _ in runs]
        print(f"{epoch + 1:>5} " + "".join(cells))
    print()
    for name, (config, _, result) in zip(names, runs):
        print(f"{name:<{width}} ({config['algorithm']}) {result['status']}: {best} val "
              f"{show(result[f'{best}_val_{key}'])} "
              f"at epoch {result[f'{best}_val_epoch']}; test ensemble {show(result[f'test_{key}_ensemble'])} ± "
              f"{show(result['test_ci_ensemble'])}, best single {show(result[f'test_{key}_best'])} ± "
              f"{show(result['test_ci_best'])} ({result['test_tasks']} tasks)")


if __name__ == "__main__":
    main()

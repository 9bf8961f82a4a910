"""tools/omniglot_report.py on run directories written in common.py's format, with numbers chosen to check by hand:
the paired GS − OG differences, their t-intervals and verdicts, and the check's table beside the published numbers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import maml_gs
from test_report import PNG_MAGIC, config_of, write_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import omniglot_report  # noqa: E402


def study_run(root: Path, side: str, tasks: int, seed: int, val: list[float], test: float) -> None:
    run_dir = root / f"maml_{side}__omniglot__5w1s__t{tasks}__{seed}"
    config = config_of(maml_gs, "maml_gs", "maml_gs" if side == "gs" else "maml", run_dir, dataset="omniglot",
                       shots=1, tasks=tasks, epochs=len(val), gs=side == "gs", seed=seed, filters=32)
    write_run(run_dir, config, val, {"test_acc_ensemble": test, "test_ci_ensemble": 0.01})


def test_paired_differences_intervals_and_verdicts(tmp_path):
    # Task batch 5: GS above OG by 2 and 4 points over the first 2 of 6 epochs (mean +3, t-interval over two seeds:
    # 12.706 · sd(2, 4)/√2 = 12.706 · 1.414/1.414 = ±12.71), best epoch 2 vs 5 in both (−3 ± 0): "supported".
    for seed, lead in ((1, 0.02), (2, 0.04)):
        og = [0.50, 0.60, 0.70, 0.75, 0.80, 0.79]
        study_run(tmp_path / "study", "og", 5, seed, og, 0.80)
        study_run(tmp_path / "study", "gs", 5, seed, [0.50 + lead, 0.90, 0.85, 0.84, 0.83, 0.82], 0.81)
    # Task batch 1: identical curves: a zero difference with zero spread.
    for seed in (1, 2):
        for side in ("og", "gs"):
            study_run(tmp_path / "study", side, 1, seed, [0.4, 0.5, 0.6], 0.6)
    lines = omniglot_report.study_section(tmp_path / "study", tmp_path)
    text = "\n".join(lines)
    t5 = next(line for line in lines if line.startswith("| 5 |"))
    # early mean (first 2 epochs): OG 55.00; GS (52+90)/2 = 71.00 and (54+90)/2 = 72.00 -> 71.50; diff +16.50
    assert t5.split(" | ")[3] == "55.00, 71.50, +16.50 ± 6.35"  # 12.706 · 0.7071 / √2 = 6.35
    assert t5.split(" | ")[4] == "5.00, 2.00, -3.00 ± 0.00"
    assert t5.split(" | ")[5].rstrip(" |") == "80.00, 81.00, +1.00 ± 0.00"
    assert "- GS higher early (task batch 5): +16.50 ± 6.35 points: supported (the interval excludes 0)" in text
    assert "(task batch 1): +0.00 ± 0.00 points: not supported: the interval includes 0" in text
    # Task batch 1's best epochs are all the last (3 of 3): censored, said; task batch 5's (5 and 2 of 6) are not.
    assert sum("the best epoch is censored" in line for line in lines) == 1
    assert (tmp_path / "gs_study.png").read_bytes().startswith(PNG_MAGIC)


def test_verdicts():
    assert omniglot_report.verdict(1.0, 0.5, higher_is_claim=True).startswith("supported")
    assert omniglot_report.verdict(-1.0, 0.5, higher_is_claim=True).startswith("contradicted")
    assert omniglot_report.verdict(0.2, 0.5, higher_is_claim=True).startswith("not supported")
    assert omniglot_report.verdict(-1.0, 0.5, higher_is_claim=False).startswith("supported")
    assert omniglot_report.verdict(1.0, float("nan"), higher_is_claim=True).startswith("one seed")
    assert omniglot_report.interval([1.0, 3.0]) == pytest.approx((2.0, 12.7062 * 2 ** 0.5 / 2 ** 0.5), rel=1e-4)


def test_the_check_beside_the_published_numbers(tmp_path):
    run_dir = tmp_path / "check"
    config = config_of(maml_gs, "maml_gs", "maml", run_dir, dataset="omniglot", shots=1, tasks=8, epochs=3,
                       iters_per_epoch=250, gs=False, filters=64, queries=1, inner_lr=0.1)
    write_run(run_dir, config, [0.85, 0.88, 0.90], {"test_acc_ensemble": 0.9312, "test_ci_ensemble": 0.0061})
    path = omniglot_report.main(["--check", str(run_dir), "--out", str(tmp_path / "out"), "--command", "make a;make b"])
    assert path == 0
    text = (tmp_path / "out" / "omniglot.md").read_text()
    assert "750 meta-iterations (3 epochs of 250)" in text and "50,000-60,000" in text
    assert "| ours, top-5 ensemble, 600 tasks | 93.12 ± 0.61 |" in text
    assert "| MAML, Finn et al. 2017 (arXiv 1703.03400), Table 1, Omniglot 5-way 1-shot | 98.7 ± 0.4 |" in text
    assert "| 750 | 90.00 ± 1.00 |" in text and "make a\nmake b" in text
    assert (tmp_path / "out" / "omniglot" / "check_validation.png").read_bytes().startswith(PNG_MAGIC)

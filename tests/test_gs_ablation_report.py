"""tools/gs_ablation_report.py on run directories in common.py's format, numbers chosen to check by hand."""
from __future__ import annotations

import sys
from pathlib import Path

import maml_gs
from test_report import PNG_MAGIC, config_of, write_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gs_ablation_report  # noqa: E402

OG = [0.50, 0.60, 0.70, 0.75, 0.80, 0.79]  # 6 epochs: the first 2 are "early"


def ablation_run(root: Path, side: str, tasks: int, seed: int, lead: float, test: float) -> None:
    run_dir = root / f"maml_{side}__omniglot__5w1s__t{tasks}__{seed}"
    source = {"og": "both", "gs": "both", "gs_batch": "batch", "gs_history": "history"}[side]
    config = config_of(maml_gs, "maml_gs", f"maml_{side}", run_dir, dataset="omniglot", shots=1, tasks=tasks,
                       epochs=len(OG), iters_per_epoch=30, gs=side != "og", gs_source=source, seed=seed)
    columns = {} if side == "og" else {"sigma_lambda": [0.5] * len(OG)}
    if side == "gs":
        columns["sigma_m"] = [0.6] * len(OG)
    write_run(run_dir, config, [v + lead for v in OG[:2]] + OG[2:], {"test_acc_ensemble": test,
                                                                     "test_ci_ensemble": 0.01}, columns)


def test_sources_and_task_batches_paired_by_seed(tmp_path):
    # Early leads over OG (points): both +2/+4 (mean +3 ± 12.706·1.414/1.414 = ±12.71), batch +1/+1, history 0/0.
    for seed, lead in ((1, 0.02), (2, 0.04)):
        for side, its_lead in (("og", 0.0), ("gs", lead), ("gs_batch", 0.01), ("gs_history", 0.0)):
            ablation_run(tmp_path / "runs", side, 5, seed, its_lead, 0.80 + its_lead)
        for tasks in (1, 10):
            ablation_run(tmp_path / "runs", "og", tasks, seed, 0.0, 0.8)
            ablation_run(tmp_path / "runs", "gs", tasks, seed, 0.01 * tasks, 0.8)
    assert gs_ablation_report.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "gs_ablation.md").read_text()
    assert "| both − OG | 2 | +3.00 ± 12.71 | +0.00 ± 0.00 | +3.00 ± 12.71 |" in text
    assert "| batch − OG | 2 | +1.00 ± 0.00 |" in text and "| history − OG | 2 | +0.00 ± 0.00 |" in text
    assert "- batch higher early than OG: +1.00 ± 0.00 points: supported" in text
    assert "- history higher early than OG: +0.00 ± 0.00 points: not supported" in text
    assert "| 10 | 1,800 | 2 | +10.00 ± 0.00 |" in text and "| 1 | 180 | 2 | +1.00 ± 0.00 |" in text
    assert "- the gain grows with the task batch (+1.00, +3.00, +10.00 at 1, 5, 10): so, in the means" in text
    assert (tmp_path / "out" / "gs_ablation" / "sources.png").read_bytes().startswith(PNG_MAGIC)
    assert "| both | 0.500 | 0.500 | 0.600 | 0.600 |" in text and "| history | 0.500 | 0.500 | — | — |" in text
    assert "16 finished runs, written over 0 minutes of wall time" in text


def test_no_runs_is_a_message(tmp_path, capsys):
    assert gs_ablation_report.main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 1
    assert "no finished runs" in capsys.readouterr().err

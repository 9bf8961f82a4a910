"""tools/report.py on a fixture of run directories: the tables' rows, SPEED-UP as O. Chang and H. Lipson,
"Accelerating Meta-Learning by Sharing Gradients" (arXiv 2312.08398) define it,
"not yet run" and "unfinished" cells, and the figure files.

Two runs are real (maml_gs.py --gs / --no-gs on synthetic data, as test_cli.py runs it); the others are
written with common.py's own writers (common.write_json, common.write_csv) and configs built like
common.Run writes them (program, algorithm, every Args field, out, resume, torch), with chosen numbers.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import lwdgh
import maml_gs
import mamlpp_gs
import metasgd_gs
from test_cli import TINY

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GS_FILES = {"maml_gs": maml_gs, "metasgd_gs": metasgd_gs, "mamlpp_gs": mamlpp_gs}


def config_of(module, program: str, algorithm: str, out: Path, **fields) -> dict:
    """config.json as common.Run writes it, for `module`'s Args with these fields."""
    args = module.Args(**fields)
    return {"program": program, "algorithm": algorithm, **dataclasses.asdict(args), "out": str(out), "resume": "",
            "torch": torch.__version__}


def write_run(run_dir: Path, config: dict, val: list[float], result: dict | None = None,
              columns: dict[str, list[float]] | None = None) -> None:
    """A run directory in common.py's format: config.json, metrics.csv (one row per epoch of `val`), and
    result.json unless result is None (an unfinished run). max_val_* come from `val` like common.finish's."""
    run_dir.mkdir(parents=True)
    common.write_json(run_dir / "config.json", config)
    rows = [{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "train_acc": 0.5, "val_acc": v, "val_ci": 0.01,
             "skipped_steps": 0, "seconds": 1.5, **{k: vs[e] for k, vs in (columns or {}).items()}}
            for e, v in enumerate(val)]
    common.write_csv(run_dir / "metrics.csv", rows)
    if result is not None:
        best = max(rows, key=lambda row: (row["val_acc"], -row["epoch"]))
        common.write_json(run_dir / "result.json", {
            "status": "finished", "epochs_run": len(rows), "max_val_acc": best["val_acc"],
            "max_val_epoch": best["epoch"],
            "test_acc_best": result["test_acc_ensemble"] - 0.01, "test_ci_best": result["test_ci_ensemble"],
            "ensemble_epochs": [best["epoch"]], "test_tasks": 600, **result})


def curve(peak_epoch: int, epochs: int, peak: float = 0.7) -> list[float]:
    """Validation accuracies rising to `peak` at peak_epoch (first reached there), lower after it."""
    return [peak - 0.2 * abs(e - peak_epoch) / epochs - (0.001 if e > peak_epoch else 0) for e in range(1, epochs + 1)]


def write_gs(root: Path, method: str, dataset: str, shots: int, tasks: int, gs: bool, seed: int, epochs: int,
             peak_epoch: int, test: tuple[float, float] | None, lr: float = 0.1, status: str = "finished",
             done: int | None = None, folder: str = "table1") -> Path:
    """One run of a GS-family file; test=None: unfinished after `done` epochs."""
    side = "gs" if gs else "og"
    run_dir = root / folder / f"{method}_{side}__{dataset}__5w{shots}s__t{tasks}__lr{lr}__{seed}"
    config = config_of(GS_FILES[f"{method}_gs"], f"{method}_gs", method + ("_gs" if gs else ""), run_dir,
                       dataset=dataset, shots=shots, tasks=tasks, epochs=epochs, gs=gs, seed=seed, inner_lr=lr)
    columns = {"sigma_m": [0.5] * epochs, "sigma_lambda": [0.4] * epochs} if gs else None
    val = curve(peak_epoch, epochs if test is not None else done)
    result = None if test is None else {"status": status, "test_acc_ensemble": test[0], "test_ci_ensemble": test[1]}
    write_run(run_dir, config, val, result, columns)
    return run_dir


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> Path:
    """maml_gs.py --gs and --no-gs on synthetic data through the command line's entry point (seconds)."""
    root = tmp_path_factory.mktemp("real")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is many times faster on a busy machine
    try:
        for gs in ("--gs", "--no-gs"):
            maml_gs.main(TINY + [gs, "--out", str(root / "smoke" / gs.strip("-"))])
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def runs(real_runs: Path) -> Path:
    """The fixture: the real runs under smoke/, and written ones (numbers chosen to check by hand)."""
    root = real_runs
    # Table 1, MAML/5 on CUB, one seed: OG best at epoch 9, GS at 6 -> speed-up (9 − 6) / 6 = 50%.
    write_gs(root, "maml", "cub", 5, 5, False, 1, 150, 9, (0.8321, 0.0140))
    write_gs(root, "maml", "cub", 5, 5, True, 1, 150, 6, (0.8345, 0.0138))
    # A shorter second configuration of that cell: the table keeps the 150-epoch one, "Other runs" lists it.
    write_gs(root, "maml", "cub", 5, 5, False, 1, 3, 2, (0.40, 0.02), folder="smoke2")
    write_gs(root, "maml", "cub", 5, 5, True, 1, 3, 2, (0.41, 0.02), folder="smoke2")
    # Table 1, MAML/5 on MiniImagenet, three seeds: OG epochs 10, 12, 14 (mean 12), GS 4, 6, 8 (mean 6)
    # -> (12 − 6) / 6 = 100%; OG accuracies 66, 67, 68 -> 67.00 ± 1.00 sd.
    for seed, (og_ep, gs_ep, og_acc, gs_acc) in enumerate([(10, 4, 0.66, 0.67), (12, 6, 0.67, 0.69),
                                                            (14, 8, 0.68, 0.71)], start=1):
        write_gs(root, "maml", "miniimagenet", 5, 5, False, seed, 250, og_ep, (og_acc, 0.018))
        write_gs(root, "maml", "miniimagenet", 5, 5, True, seed, 250, gs_ep, (gs_acc, 0.017))
    # Meta-SGD/1 on CUB: OG finished, GS unfinished after 4 of 750 epochs.
    write_gs(root, "metasgd", "cub", 5, 1, False, 1, 750, 30, (0.8012, 0.0151))
    write_gs(root, "metasgd", "cub", 5, 1, True, 1, 750, 3, None, done=4)
    # MAML++/5 on CUB: OG diverged (it still has a meta-test), GS best at epoch 20, OG at 30 -> 50%.
    write_gs(root, "mamlpp", "cub", 5, 5, False, 1, 150, 30, (0.7011, 0.0172), status="diverged")
    write_gs(root, "mamlpp", "cub", 5, 5, True, 1, 150, 20, (0.7432, 0.0165))
    # Figures 8 (CUB, 10x inner lr), MAML 1-shot task batch 5: GS best at 5, OG at 25 -> (25 − 5) / 5 = 400%.
    write_gs(root, "maml", "cub", 1, 5, False, 1, 150, 25, (0.5511, 0.0180), lr=1.0, folder="figures")
    write_gs(root, "maml", "cub", 1, 5, True, 1, 150, 5, (0.6022, 0.0175), lr=1.0, folder="figures")
    # "Cross-Task Gradient Harmonization for Meta-Learning" (the LWDGH paper), Table 5 (MiniImagenet 1-shot,
    # 20 epochs): the three variants, GCI 5.0/4.8/4.6 per epoch.
    for variant, flags, acc, gci in (("maml", dict(p_min=1.0, p_max=1.0), 0.4801, (5.0, 4.8, 4.6)),
                                     ("lwdgh", dict(ee=False), 0.4955, (4.9, 4.7, 4.5)),
                                     ("lwdgh_ee", {}, 0.5012, (4.8, 4.6, 4.4))):
        run_dir = root / "lwdgh" / f"table5_{variant}__miniimagenet__5w1s__1"
        name = "lwdgh_ee" if flags.get("ee", True) else "lwdgh"
        config = config_of(lwdgh, "lwdgh", name, run_dir, dataset="miniimagenet", shots=1, filters=32, epochs=20,
                           iters_per_epoch=200, **flags)
        write_run(run_dir, config, [0.40, 0.45, 0.47], {"test_acc_ensemble": acc, "test_ci_ensemble": 0.0175},
                  {"gci_mean": list(gci), "gci_harmonised": list(gci), "explore_fraction": [1.0] * 3,
                   "weight_entropy": [1.3] * 3})
    # Table 6's 20%-fixed row and Table 3's MAML row (ResNet-12).
    for name, flags, acc, gci in (("table6_lwdgh_ee_e20fixed", dict(transition=0.2, schedule="fixed", epochs=20,
                                                                    filters=32), 0.52, 4.5),
                                  ("table3_maml_resnet12", dict(backbone="resnet12", epochs=300, p_min=1.0, p_max=1.0),
                                   0.55, 4.0)):
        run_dir = root / "lwdgh" / f"{name}__miniimagenet__5w1s__1"
        config = config_of(lwdgh, "lwdgh", "lwdgh_ee", run_dir, dataset="miniimagenet", shots=1, iters_per_epoch=200,
                           **flags)
        write_run(run_dir, config, [0.40, 0.45, 0.47], {"test_acc_ensemble": acc, "test_ci_ensemble": 0.0175 if
                                                        name.startswith("table6") else 0.018}, {"gci_mean": [gci] * 3})
    # "Cooperative Meta-Learning with Gradient Augmentation" (the CML paper, arXiv 2406.04639): CML on MAML++,
    # MiniImagenet 5-shot (the config: maml_gs.Args' fields plus base, gamma).
    run_dir = root / "cml" / "cml_mamlpp__miniimagenet__5w5s__t2__1"
    config = {**config_of(maml_gs, "cml", "cml_mamlpp", run_dir, dataset="miniimagenet", shots=5, tasks=2, epochs=250),
              "base": "mamlpp", "gamma": 1.0}
    write_run(run_dir, config, [0.60, 0.66, 0.69], {"test_acc_ensemble": 0.6950, "test_ci_ensemble": 0.0160},
              {"loss_meta": [1.2, 0.9, 0.8], "loss_co": [1.4, 1.0, 0.9], "grad_cos": [0.1, 0.2, 0.2],
               "grad_norm_ratio": [1.1, 1.0, 1.0]})
    # reproduce-omniglot, MAML 5-way 1-shot, task batch 8: beside Finn et al.'s published number.
    write_gs(root, "maml", "omniglot", 1, 8, False, 1, 100, 40, (0.9712, 0.0040), folder="omniglot")
    write_gs(root, "maml", "omniglot", 1, 8, True, 1, 100, 20, (0.9730, 0.0038), folder="omniglot")
    # Runs a report over `runs` must not read.
    write_gs(root, "maml", "omniglot", 1, 5, True, 1, 5, 2, (0.9, 0.01), folder="quick")
    return root


@pytest.fixture(scope="module")
def written(runs: Path, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("results")
    path = report.write_report([runs], out, "report", exclude=["quick"])
    return path.read_text(), out


def row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def lines_after(text: str, start: str) -> list[str]:
    """The lines of `text` from the first line that starts with `start`."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    return lines[first:]


def test_speed_up_is_paper_002s_definition():
    # Section 3: Speed-up = (Epoch_OG − Epoch_GS) / Epoch_GS. Best OG epoch 9, GS 6: 3 epochs saved of 6.
    assert report.speed_up(9, 6) == pytest.approx(0.5)
    assert report.speed_up(6, 9) == pytest.approx(-1 / 3)  # gradient sharing slower: negative
    assert report.speed_up(234, 100) == pytest.approx(1.34)  # the paper's "up to 134%"


def test_table1_rows_paper_beside_ours(written):
    text, _ = written
    table = lines_after(text, "### 5-way 5-shot, inner lr 0.1 (Chang & Lipson, Table 1")
    header = table[2]
    assert header == row("METHOD/TASKS", "source", "CUB ORIGINAL", "CUB GRADSHARE", "CUB SPEED-UP",
                         "MINIIMAGENET ORIGINAL", "MINIIMAGENET GRADSHARE", "MINIIMAGENET SPEED-UP")
    assert table[4] == row("MAML/5", "paper", "83.2 ± 1.4", "83.4 ± 1.4", "66%", "67.7 ± 1.8", "67.0 ± 1.8", "1%")
    # GS across seeds: 67, 69, 71 -> 69.00 ± 2.00 sd; CIs 1.8 / 1.7 over the test tasks.
    assert table[5] == row("", "ours", "83.21 ± 1.40", "83.45 ± 1.38", "50% (OG ep 9, GS ep 6)",
                           "67.00 ± 1.00 sd, 3 seeds (task CI ± 1.80)", "69.00 ± 2.00 sd, 3 seeds (task CI ± 1.70)",
                           "100% (mean OG ep 12.0 of 3 seeds, GS ep 6.0 of 3)")
    # Every row of the paper's table is there, missing runs say so.
    assert table[6] == row("MAML/1", "paper", "82.6 ± 1.5", "82.7 ± 1.5", "44%", "66.4 ± 1.8", "68.3 ± 1.8",
                           "134%")
    assert table[7] == row("", "ours", "not yet run", "not yet run", "—", "not yet run", "not yet run", "—")
    assert table[12] == row("MAML++/5", "paper", "72.7 ± 1.7", "73.8 ± 1.7", "42%", "68.9 ± 1.8", "69.4 ± 1.8",
                            "26%")
    assert table[13] == row("", "ours", "70.11 ± 1.72; diverged", "74.32 ± 1.65",
                            "50% (OG ep 30, GS ep 20); OG diverged",
                            "not yet run", "not yet run", "—")
    assert table[15] == row("", "ours", *["not yet run", "not yet run", "—"] * 2)
    assert table[16] == ""  # six paper rows, each with ours below


def test_figure_panels_tables_and_unfinished_runs(written):
    text, _ = written
    table = lines_after(text, "### 5-way 1-shot, inner lr 0.1 (Chang & Lipson, the 1-shot panels of Figures 4-7")
    assert table[2].startswith("| METHOD/TASKS | CUB ORIGINAL")
    # Meta-SGD/1: the GS run has 4 of its 750 epochs.
    table = lines_after(text, "### 5-way 5-shot, inner lr 0.1 (Chang & Lipson, Table 1")
    metasgd_1 = table[table.index(row("META-SGD/1", "paper", "81.6 ± 1.5", "79.6 ± 1.6", "54%", "64.8 ± 1.9",
                                      "64.9 ± 1.9", "37%")) + 1]
    assert metasgd_1 == row("", "ours", "80.12 ± 1.51", "unfinished: epoch 4/750", "—", "not yet run",
                            "not yet run", "—")
    table = lines_after(text, "### 5-way 1-shot, inner lr 1.0 (Chang & Lipson, the 1-shot panels of Figures 8-11")
    assert table[4] == row("MAML/5", "55.11 ± 1.80", "60.22 ± 1.75", "400% (OG ep 25, GS ep 5)",
                           "not yet run", "not yet run", "—")


def test_real_runs_make_their_own_table(written, real_runs):
    text, _ = written
    results = {gs: json.loads((real_runs / "smoke" / gs / "result.json").read_text()) for gs in ("gs", "no-gs")}
    cell = {gs: f"{100 * r['test_acc_ensemble']:.2f} ± {100 * r['test_ci_ensemble']:.2f}" for gs, r in results.items()}
    og, gs = results["no-gs"]["max_val_epoch"], results["gs"]["max_val_epoch"]
    table = lines_after(text, "### 3-way 1-shot, inner lr 0.1, Synthetic")
    assert table[2] == row("METHOD/TASKS", "SYNTHETIC ORIGINAL", "SYNTHETIC GRADSHARE", "SYNTHETIC SPEED-UP")
    assert table[4] == row("MAML/2", cell["no-gs"], cell["gs"], f"{(og - gs) / gs:.0%} (OG ep {og}, GS ep {gs})")


def test_lwdgh_and_cml_tables(written):
    text, _ = written
    table = lines_after(text, "### MiniImagenet 5-way, Convnet4, 20 epochs (the LWDGH paper, Table 5")
    assert table[2] == row("Method", "source", "1-shot", "1-shot GCI")
    assert table[4:10] == [
        row("MAML", "paper", "48.17 ± 1.75", "4.8171"), row("", "ours", "48.01 ± 1.75", "4.8000"),
        row("MAML + LWDGH", "paper", "50.73 ± 1.63", "4.7545"), row("", "ours", "49.55 ± 1.75", "4.7000"),
        row("MAML + LWDGH + EE", "paper", "51.33 ± 1.76", "4.7146"), row("", "ours", "50.12 ± 1.75", "4.6000")]
    table = lines_after(text, "### MiniImagenet 5-way, Convnet4, 300 epochs (the LWDGH paper, Table 1")
    assert table[4:8] == [row("MAML", "paper", "48.17 ± 1.75", "—", "63.11 ± 0.91", "—"),
                          row("", "ours", "not yet run", "—", "not yet run", "—"),
                          row("MAML + LWDGH + EE", "paper", "51.40 ± 1.76", "—", "67.06 ± 0.97", "—"),
                          row("", "ours", "not yet run", "—", "not yet run", "—")]
    assert "### CUB 5-way, Convnet4, 300 epochs (the LWDGH paper, Table 4)" in text
    # Table 6 shares the 20-epoch runs: its 33%-cosine row is Table 5's LWDGH + EE run, the other rows its own.
    table = lines_after(text, "### MiniImagenet 5-way, Convnet4, 20 epochs (the LWDGH paper, Table 6")
    assert table[4:6] == [row("MAML + LWDGH + EE, E 20% fixed", "paper", "50.43 ± 1.96", "—"),
                          row("", "ours", "52.00 ± 1.75", "4.5000")]
    assert table[10:12] == [row("MAML + LWDGH + EE, E 33% cosine", "paper", "51.33 ± 1.76", "—"),
                            row("", "ours", "50.12 ± 1.75", "4.6000")]
    assert len(table[2:table.index("", 2)]) == 2 + 2 * 6  # header, rule, 6 rows of paper and ours
    lwdgh = "the LWDGH paper"
    for title, cells in ((f"### tieredImageNet 5-way, Convnet4, 300 epochs ({lwdgh}, Table 2, the Convnet4 rows", 6),
                         (f"### tieredImageNet 5-way, ResNet-12, 300 epochs ({lwdgh}, Table 2, the Resnet12 row", 4),
                         ("### MiniImagenet 5-way, ResNet-12, 300 epochs (the LWDGH paper, Table 3", 4)):
        assert len(lines_after(text, title)[2].split("|")) - 2 == cells, title  # Method, source, (acc, GCI) per shots
    table = lines_after(text, "### MiniImagenet 5-way, ResNet-12, 300 epochs (the LWDGH paper, Table 3")
    assert table[4:8] == [row("MAML", "paper", "54.87 ± 1.82", "—"), row("", "ours", "55.00 ± 1.80", "4.0000"),
                          row("MAML + LWDGH + EE", "paper", "59.13 ± 2.01", "—"), row("", "ours", "not yet run", "—")]
    table = lines_after(text, "### MiniImagenet 5-way (the CML paper)")
    assert table[2] == row("Method", "source", "1-shot ensemble", "1-shot best single", "5-shot ensemble",
                           "5-shot best single")
    # The paper's number is the reference code's best single model: it stands beside ours. Every base's rows, with
    # and without CML (BOIL's too), are listed; the other data sets have tables of their own, without numbers.
    assert [line.split(" | ")[0].lstrip("| ") for line in table[4:20:2]] == report.CML_METHOD_ORDER
    assert table[10:12] == [row("MAML++ + CML", "paper", "—", "—", "—", "70.08"),
                            row("", "ours", "not yet run", "not yet run", "69.50 ± 1.60", "68.50 ± 1.60")]
    for name in ("Omniglot", "CIFAR-FS", "FC100", "VGG Flower"):
        table = lines_after(text, f"### {name} 5-way (the CML paper's rows; our copy gives no numbers)")
        assert table[4:6] == [row("MAML", "paper", "—", "—", "—", "—"),
                              row("", "ours", "not yet run", "not yet run", "not yet run", "not yet run")]


def test_other_runs_and_every_run_directory_listed(written, runs):
    text, _ = written
    others = lines_after(text, "## Other runs")
    assert sum("smoke2" in line for line in others[:others.index("## Run directories")]) == 2  # OG and GS
    listed = lines_after(text, "## Run directories")
    # not quick/
    assert sum(line.startswith(f"| {runs}") for line in listed) == 2 + 2 + 2 + 6 + 2 + 2 + 2 + 3 + 2 + 1 + 2
    assert "/quick/" not in text


def test_figures_are_pngs_and_linked(written):
    text, out = written
    names = {p.name for p in (out / "report").iterdir()}
    assert {"val_cub_5w_lr0.1.png", "sigma_cub_5w_lr0.1.png", "val_miniimagenet_5w_lr0.1.png",
            "val_cub_5w_lr1.0.png", "sigma_cub_5w_lr1.0.png", "val_synthetic_3w_lr0.1.png",
            "lwdgh_miniimagenet_5w_20ep.png", "cml_mamlpp_cml_miniimagenet_5w5s.png"} <= names
    for name in names:
        assert (out / "report" / name).read_bytes().startswith(PNG_MAGIC)
        assert f"(report/{name})" in text


def test_only_found_cli_for_a_scaled_down_grid(runs, tmp_path):
    """`--runs runs/quick --name quick --only-found`: what reproduce-quick's report runs."""
    done = subprocess.run([sys.executable, str(REPO / "tools" / "report.py"), "--runs", str(runs / "quick"),
                           "--out", str(tmp_path), "--name", "quick", "--only-found", "--title", "Quick"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "quick.md").read_text()
    # Only the runs found: no paper table, no rows of the papers' grids (the missing OG run is still named).
    assert text.startswith("# Quick\n") and "| paper |" not in text and "CUB" not in text and "Table 1" not in text
    table = lines_after(text, "### 5-way 1-shot, inner lr 0.1, Omniglot")
    assert table[4] == row("MAML/5", "not yet run", "90.00 ± 1.00", "—")
    assert {p.name for p in (tmp_path / "quick").iterdir()} == {"val_omniglot_5w_lr0.1.png",
                                                                "sigma_omniglot_5w_lr0.1.png"}


def test_report_reads_the_columns_the_algorithms_write(tmp_path):
    """The metrics.csv columns the report plots are those the algorithm files log."""
    import cml
    tiny = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--filters", "4", "--tasks", "2", "--ways", "3",
            "--queries", "2", "--inner-steps", "1", "--epochs", "1", "--iters-per-epoch", "1", "--val-tasks", "2",
            "--test-tasks", "2", "--ensemble", "1", "--quiet"]
    for module, wanted in ((cml, set(report.CML_LOSSES) | {"grad_cos"}), (lwdgh, {report.LWDGH_GCI})):
        module.main(tiny + ["--out", str(tmp_path / module.__name__)])
        with open(tmp_path / module.__name__ / "metrics.csv", newline="") as f:
            assert wanted <= set(next(csv.DictReader(f))), module.__name__


def test_lwdgh_figures_from_real_runs(tmp_path):
    """Tiny real lwdgh.py runs (MAML and MAML + LWDGH + EE on Conv4, LWDGH + EE on a ResNet-12, synthetic data):
    the training loss (the LWDGH paper's Figure 4), loss against GCI (Figure 2) and predictions (Figure 5) are drawn;
    Figure 5's predictions are the best single checkpoint's meta-test, so their accuracy is result.json's
    test_acc_best; the ResNet-12 run trains and has a table of its own."""
    tiny = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--filters", "4", "--tasks", "2", "--ways", "3",
            "--queries", "2", "--inner-steps", "1", "--test-inner-steps", "2", "--epochs", "2", "--iters-per-epoch",
            "3", "--val-tasks", "4", "--test-tasks", "6", "--ensemble", "2", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, flags in (("maml", ["--p-min", "1", "--p-max", "1"]), ("ee", []),
                            ("resnet12", ["--backbone", "resnet12", "--resnet-width", "2"])):
            lwdgh.main(tiny + flags + ["--out", str(tmp_path / "runs" / name)])
        text = report.write_report([tmp_path / "runs"], tmp_path / "out", "report").read_text()
        run = report.read_run(tmp_path / "runs" / "ee")
        got = report.predict_test_tasks(run, run.result["test_tasks"])
    finally:
        torch.set_num_threads(threads)
    figures = {"lwdgh_synthetic_3w_2ep.png", "lwdgh_loss_gci_synthetic_3w_2ep.png",
               "lwdgh_predictions_synthetic_3w_2ep.png", "lwdgh_synthetic_3w_2ep_resnet12.png",
               "lwdgh_loss_gci_synthetic_3w_2ep_resnet12.png"}
    assert {p.name for p in (tmp_path / "out" / "report").iterdir()} == figures
    for name in figures:
        assert (tmp_path / "out" / "report" / name).read_bytes().startswith(PNG_MAGIC)
        assert f"(report/{name})" in text
    assert got["predictions"].shape == got["labels"].shape == (6, 3 * 2) and got["images"].shape == (6, 6, 1, 16, 16)
    assert float((got["predictions"] == got["labels"]).double().mean()) == pytest.approx(run.result["test_acc_best"])
    resnet = json.loads((tmp_path / "runs" / "resnet12" / "result.json").read_text())
    table = lines_after(text, "### Synthetic 3-way, ResNet-12, 2 epochs")
    assert table[4] == row("MAML + LWDGH + EE", "ours", f"{100 * resnet['test_acc_ensemble']:.2f} ± "
                           f"{100 * resnet['test_ci_ensemble']:.2f}", table[4].split(" | ")[-1].rstrip(" |"))


def test_full_omniglot_beside_the_published_numbers(written):
    """reproduce-omniglot's tables: a "published" row above ours (Finn et al.'s MAML; MAML++'s and Meta-SGD's not
    transcribed), every method at task batch 8, "not yet run" where no run is."""
    text, _ = written
    table = lines_after(text, "### 5-way 1-shot, inner lr 0.1, Omniglot (reproduce-omniglot; published: Finn et al.")
    assert table[2] == row("METHOD/TASKS", "source", "OMNIGLOT ORIGINAL", "OMNIGLOT GRADSHARE", "OMNIGLOT SPEED-UP")
    assert table[4:6] == [row("MAML/8", "published", "98.7 ± 0.4", "—", "—"),
                          row("", "ours", "97.12 ± 0.40", "97.30 ± 0.38", "100% (OG ep 40, GS ep 20)")]
    assert table[6:8] == [row("META-SGD/8", "published", "not transcribed", "—", "—"),
                          row("", "ours", "not yet run", "not yet run", "—")]
    table = lines_after(text, "### 20-way 5-shot, inner lr 0.1, Omniglot (reproduce-omniglot")
    assert table[4] == row("MAML/8", "published", "98.9 ± 0.2", "—", "—")


def test_papers_cited_by_title_and_arxiv_id(written):
    """The report cites each paper in full (title, authors, arXiv id) once, then by a short form; it names no
    file of a private folder and no internal paper number."""
    text, _ = written
    assert not re.search(r"papers?/|paper 0\d\d", text, re.IGNORECASE)
    for citation in (report.PAPER_002, report.PAPER_003, report.PAPER_004):
        assert text.count(f"Paper: {citation}.") == 1, citation
    assert "Accelerating Meta-Learning by Sharing Gradients" in text and "arXiv 2312.08398" in text
    assert "Cooperative Meta-Learning with Gradient Augmentation" in text and "arXiv 2406.04639" in text
    assert "Cross-Task Gradient Harmonization for Meta-Learning" in text


@pytest.mark.parametrize("make_folder", [False, True])
def test_no_runs_names_the_folder(tmp_path, capsys, make_folder):
    """`make report` with no runs (RUNS missing or empty): the report and the message name the folder searched."""
    folder = tmp_path / "runs"
    if make_folder:
        folder.mkdir()
    assert report.main(["--runs", str(folder), "--out", str(tmp_path / "results"), "--name", "r",
                        "--exclude", "quick", "demo"]) == 0
    err = capsys.readouterr().err
    assert f"no runs under {folder} (excluding quick, demo)" in err
    text = (tmp_path / "results" / "r.md").read_text()
    assert f"no runs under {folder} (excluding quick, demo)" in text and "under :" not in text
    assert "No run directories found." in text


def test_compare_heads_each_column_by_its_run_directory(real_runs, tmp_path, capsys):
    """tools/compare.py on two runs of one file and configuration (both record the algorithm maml_gs, as two
    seeds would): each column is headed by its run directory's name, each summary line names its algorithm."""
    import shutil

    import compare
    second = tmp_path / "gs-again"
    shutil.copytree(real_runs / "smoke" / "gs", second)
    compare.main([str(real_runs / "smoke" / "gs"), str(second)])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["epoch", "gs", "gs-again"]
    assert [line.split()[:2] for line in out[-2:]] == [["gs", "(maml_gs)"], ["gs-again", "(maml_gs)"]]
    assert compare.labels([Path("a/run"), Path("b/run"), Path("c/other")]) == ["a/run", "b/run", "other"]

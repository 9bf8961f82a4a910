"""The Makefile's reproduction targets: `make -n` lists the runs of each paper table row with their flags."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
EPOCHS = {("cub", 5): 150, ("cub", 1): 750, ("miniimagenet", 5): 250, ("miniimagenet", 1): 1250}


def planned_runs(*targets: str, **variables: str) -> list[str]:
    """The command that starts each new run in `make -n` (the branch after `else`)."""
    out = subprocess.run(["make", "-n", *targets, *(f"{k}={v}" for k, v in variables.items())], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return re.findall(r"else\s+(.*?); fi", out)


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
        assert "--ways 5 --shots 5" in command and f"--epochs {EPOCHS[dataset, tasks]}" in command
        assert ("--clip-grad 10" in command) == (method == "mamlpp" and dataset == "miniimagenet")
        assert ("--no-gs" in command.split()) != gs
        seen.add((method, dataset, tasks, gs))
    assert len(seen) == len(runs)


def test_seeds_multiply_the_runs_and_name_their_directories():
    runs = planned_runs("table1-maml-cub-t5", SEEDS="1 2 3")
    assert len(runs) == 2 * 3
    assert {re.search(r"--out (\S+)", c).group(1) for c in runs} == {
        f"runs/table1/maml_{gs}__cub__5w5s__t5__{seed}" for gs in ("og", "gs") for seed in (1, 2, 3)}

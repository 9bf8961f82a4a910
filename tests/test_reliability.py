"""Faults a long run must survive: divergence, kill -9 at any moment, SIGTERM, damaged or foreign files."""
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
import maml_gs
from test_cli import REPO, TINY, Crash, metrics, run


def test_overflowing_inner_lr_diverges_cleanly(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "maml_gs.py"), *TINY, "--inner-lr", "1e38", "--max-bad-steps", "3",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "diverged" and result["epochs_run"] == 0 and result["test_acc_ensemble"] is None
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.json", "result.json", "last.pt", ".lock"}


def test_divergence_after_some_epochs_still_reports_the_best_checkpoints(tmp_path, monkeypatch):
    calls = []

    def poisoned(original):
        def step(params, state, tasks, epoch, args):
            result = original(params, state, tasks, epoch, args)
            calls.append(1)
            if len(calls) > 3:  # epoch 1 (3 iterations) trains, then every step is NaN
                return result._replace(loss=torch.tensor(float("nan")))
            return result
        return step

    monkeypatch.setattr(maml_gs, "meta_gradient", poisoned(maml_gs.meta_gradient))
    result = maml_gs.main(TINY + ["--max-bad-steps", "4", "--out", str(tmp_path / "run")])
    # Epoch 2 skips all 3 updates (the model is unchanged: the same validation accuracy), the first step of epoch 3
    # makes 4 in a row: diverged. The tie ranks the earlier epoch first, the best epoch (the earliest of the best).
    assert result["status"] == "diverged" and result["epochs_run"] == 2 and result["max_val_epoch"] == 1
    assert result["test_acc_ensemble"] is not None and result["ensemble_epochs"] == [1, 2]
    rows = metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in rows] == ["0", "3"] and rows[1]["train_loss"] == "nan"
    assert rows[0]["val_acc"] == rows[1]["val_acc"]
    # Resuming a diverged run reports it again rather than training on.
    assert run(["--resume", str(tmp_path / "run"), "--quiet"]) == result


def test_sigkill_at_random_moments_then_resume_gives_the_same_run(tmp_path):
    argv = [sys.executable, str(REPO / "maml_gs.py"), *TINY, "--epochs", "4", "--iters-per-epoch", "4"]
    reference = run(TINY + ["--epochs", "4", "--iters-per-epoch", "4", "--out", str(tmp_path / "ref")])
    rng = random.Random(0)  # seeded kill moments
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        process = subprocess.Popen(argv + ["--out", str(run_dir)], cwd=REPO, stderr=subprocess.DEVNULL)
        while not (run_dir / "config.json").exists() and process.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0) * (attempt + 1))
        process.kill()  # SIGKILL: no handler runs
        process.wait()
        resumed = subprocess.run(argv[:2] + ["--resume", str(run_dir), "--quiet"], cwd=REPO, capture_output=True,
                                 text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads((run_dir / "result.json").read_text()) == reference
        assert metrics(run_dir) == metrics(tmp_path / "ref")
        assert not list(run_dir.glob("*.tmp"))
        assert {p.name for p in run_dir.glob("epoch*.pt")} == {f"epoch{e:04d}.pt" for e in reference["ensemble_epochs"]}


@pytest.fixture
def finished_run(tmp_path) -> Path:
    run(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")])
    return tmp_path / "run"


def test_truncated_checkpoint_is_named(finished_run):
    data = (finished_run / "last.pt").read_bytes()
    (finished_run / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match=r"last\.pt is damaged"):
        run(["--resume", str(finished_run)])


def test_checkpoint_of_another_shape_is_refused(finished_run, tmp_path):
    run(TINY + ["--epochs", "1", "--filters", "4", "--out", str(tmp_path / "other")])
    shutil.copy(tmp_path / "other" / "last.pt", finished_run / "last.pt")
    with pytest.raises(SystemExit, match=r"last\.pt belongs to a run with --filters 4,"):
        run(["--resume", str(finished_run)])
    ckpt = common.load_checkpoint(finished_run / "last.pt")  # the same flags, tensors of another shape
    ckpt["args"] = json.loads((finished_run / "config.json").read_text())
    torch.save(ckpt, finished_run / "last.pt")
    with pytest.raises(SystemExit, match=r"does not fit this run: parameter bn0\.bias is \(4,\)"):
        run(["--resume", str(finished_run)])


def test_checkpoint_of_another_dtype_is_refused(finished_run):
    ckpt = common.load_checkpoint(finished_run / "last.pt")
    ckpt["params"] = {name: p.double() for name, p in ckpt["params"].items()}
    torch.save(ckpt, finished_run / "last.pt")
    with pytest.raises(SystemExit, match="torch.float64"):
        run(["--resume", str(finished_run)])


def test_foreign_file_as_checkpoint_is_refused(finished_run):
    torch.save({"model": 1}, finished_run / "last.pt")
    with pytest.raises(SystemExit, match="not a checkpoint of this project"):
        run(["--resume", str(finished_run)])


def test_resume_into_another_program_is_refused(finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    (finished_run / "config.json").write_text(json.dumps({**config, "program": "metasgd_gs"}))
    with pytest.raises(SystemExit, match="is a run of metasgd_gs.py, not maml_gs.py"):
        run(["--resume", str(finished_run)])


def test_resume_of_a_folder_that_is_no_run_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="is it a run directory"):
        run(["--resume", str(tmp_path)])


def test_damaged_cache_is_named_by_the_command_line(tmp_path, shared_data):
    argv = ["--dataset", "omniglot", "--data-root", str(shared_data), "--cache-dir", str(tmp_path / "cache"),
            "--filters", "4", "--tasks", "1", "--inner-steps", "1", "--epochs", "1", "--iters-per-epoch", "1",
            "--val-tasks", "2", "--test-tasks", "2", "--quiet"]
    run(argv + ["--out", str(tmp_path / "a")])
    (cache,) = (tmp_path / "cache").rglob("*train*.pt")
    cache.write_bytes(cache.read_bytes()[:1000])
    out = subprocess.run([sys.executable, str(REPO / "maml_gs.py"), *argv, "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert str(cache) in out.stderr and "delete it" in out.stderr


def test_kill_between_the_last_checkpoint_and_metrics_csv_loses_no_row(tmp_path, monkeypatch):
    reference = run(TINY + ["--out", str(tmp_path / "ref")])
    original = common.write_csv

    def write_csv(path, rows):
        if len(rows) == 3:  # the last epoch: last.pt is saved, metrics.csv not yet
            raise Crash()
        original(path, rows)
    monkeypatch.setattr(common, "write_csv", write_csv)
    with pytest.raises(Crash):
        run(TINY + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    assert len(metrics(tmp_path / "run")) == 2
    assert run(["--resume", str(tmp_path / "run"), "--quiet"]) == reference
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")


def test_a_checkpoint_of_another_program_or_configuration_is_refused_by_name(tmp_path):
    """A maml_gs last.pt copied into an lwdgh run, or run A's last.pt into run B: a message naming the file."""
    import lwdgh
    run_a, run_b, run_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    maml_gs.main(TINY + ["--out", str(run_a)])
    maml_gs.main(TINY + ["--seed", "2", "--out", str(run_b)])
    lwdgh_tiny = [a for a in TINY if a not in ("--gs", "--no-gs")]
    lwdgh.main(lwdgh_tiny + ["--out", str(run_c)])
    for target in (run_b, run_c):
        (target / "result.json").unlink()
        shutil.copy(run_a / "last.pt", target / "last.pt")
    with pytest.raises(SystemExit, match=r"last.pt belongs to a run with --seed 1"):
        maml_gs.main(["--resume", str(run_b), "--quiet"])
    with pytest.raises(SystemExit, match=r"last.pt is maml_gs.py's, not lwdgh.py's"):
        lwdgh.main(["--resume", str(run_c), "--quiet"])


def test_a_full_disk_while_checkpointing_is_a_message_and_the_run_resumes(tmp_path, monkeypatch):
    original = common.atomic_write

    def full(path, write):
        if path.name == "last.pt":
            raise OSError(28, "No space left on device")
        return original(path, write)
    monkeypatch.setattr(common, "atomic_write", full)
    with pytest.raises(SystemExit, match="No space left on device.*continue with --resume"):
        run(TINY + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    assert run(["--resume", str(tmp_path / "run"), "--quiet"])["status"] == "finished"


def test_a_run_killed_while_writing_its_config_starts_again_without_leftovers(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.jsonab12.tmp").write_text("{half")  # what a kill inside atomic_write leaves
    result = run(TINY + ["--out", str(run_dir)])
    assert result["status"] == "finished" and not list(run_dir.glob("*.tmp"))


def test_an_unreadable_data_folder_says_permission_denied(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "data"))
    monkeypatch.setattr(common, "_locate_omniglot", denied)
    with pytest.raises(common.DataError, match="permission denied"):
        common.load_split("omniglot", "train", tmp_path / "data")

"""maml_gs.py end to end: the command line, the run directory, resuming, Omniglot."""
import csv
import json
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import common
import maml_gs

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--filters", "8", "--tasks", "2",
        "--ways", "3", "--queries", "2", "--inner-steps", "2", "--epochs", "3", "--iters-per-epoch", "3",
        "--val-tasks", "6", "--test-tasks", "6", "--ensemble", "2", "--quiet"]
RESULT_KEYS = {"status", "data_variant", "epochs_run", "max_val_acc", "max_val_epoch", "test_acc_ensemble",
               "test_ci_ensemble", "test_acc_best", "test_ci_best", "ensemble_epochs", "test_tasks"}


def run(argv: list[str]) -> dict:
    return maml_gs.main(argv)


def metrics(run_dir: Path) -> list[dict]:
    """metrics.csv without the wall-clock column, which no two runs share."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.parametrize("gs", ["--gs", "--no-gs"])
def test_synthetic_run_writes_the_run_directory(tmp_path, gs):
    result = run(TINY + [gs, "--out", str(tmp_path / "run")])
    files = {p.name for p in (tmp_path / "run").iterdir()}
    # config, metrics, result, the resume checkpoint, the best `--ensemble 2` epochs and the lock, nothing else.
    kept = {f"epoch{e:04d}.pt" for e in result["ensemble_epochs"]}
    assert files == {"config.json", "metrics.csv", "result.json", "last.pt", ".lock"} | kept
    assert len(result["ensemble_epochs"]) == 2
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == result
    assert set(result) == RESULT_KEYS and result["status"] == "finished" and result["epochs_run"] == 3
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["algorithm"] == ("maml_gs" if gs == "--gs" else "maml") and config["gs"] == (gs == "--gs")
    rows = metrics(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert ("sigma_m" in rows[0]) == (gs == "--gs")
    best = max(rows, key=lambda r: float(r["val_acc"]))
    assert result["max_val_acc"] == pytest.approx(float(best["val_acc"]))
    assert 0 <= result["test_acc_ensemble"] <= 1 and result["test_ci_ensemble"] >= 0


def test_default_run_directory_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(TINY + ["--epochs", "1", "--seed", "7"])
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("maml_gs__synthetic__3w1s__t2__7__")


class Crash(BaseException):
    """Stands for kill -9: the process dies with no chance to save anything."""


def interrupt_after(monkeypatch, samples: int, how):
    original, calls = common.TaskSampler.sample, []

    def sample(self):
        calls.append(1)
        if len(calls) == samples:
            how()
        return original(self)
    monkeypatch.setattr(common.TaskSampler, "sample", sample)


def test_killed_run_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    reference = run(TINY + ["--out", str(tmp_path / "ref")])
    interrupt_after(monkeypatch, 5, lambda: (_ for _ in ()).throw(Crash()))  # in epoch 2, after one checkpoint
    with pytest.raises(Crash):
        run(TINY + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    assert not (tmp_path / "run" / "result.json").exists()
    resumed = run(["--resume", str(tmp_path / "run"), "--quiet"])
    assert resumed == reference
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")


def test_sigterm_saves_mid_epoch_and_resumes_exactly(tmp_path, monkeypatch):
    reference = run(TINY + ["--out", str(tmp_path / "ref")])
    interrupt_after(monkeypatch, 2, lambda: signal.raise_signal(signal.SIGTERM))  # within epoch 1
    with pytest.raises(SystemExit) as exit_info:
        run(TINY + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert common.load_checkpoint(tmp_path / "run" / "last.pt")["loop"]["iteration"] == 2
    assert run(["--resume", str(tmp_path / "run"), "--quiet"]) == reference
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")


def test_a_run_resumed_on_another_kind_of_device_finishes_and_says_its_tasks_differ(tmp_path, monkeypatch, capsys):
    """--device may change on --resume. A checkpoint whose task generator was a CUDA one (its state written
    into last.pt here, as a GPU session leaves it) resumes on the CPU with a new task stream, and says so."""
    interrupt_after(monkeypatch, 5, lambda: (_ for _ in ()).throw(Crash()))  # in epoch 2, after one checkpoint
    with pytest.raises(Crash):
        run(TINY + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    last = tmp_path / "run" / "last.pt"
    ckpt = common.load_checkpoint(last)
    ckpt["sampler"].update(generator=torch.zeros(16, dtype=torch.uint8), device="cuda")  # Philox: seed, offset
    torch.save(ckpt, last)
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    capsys.readouterr()
    result = run(["--resume", str(tmp_path / "run"), "--quiet"])
    assert result["status"] == "finished" and result["epochs_run"] == 3
    (note,) = result["notes"]
    assert note.startswith("resumed at epoch 2, iteration 1: the run sampled its training tasks on cuda and this "
                           "session on cpu")
    assert "warning: resumed at epoch 2, iteration 1: the run sampled its training tasks on cuda" in \
        capsys.readouterr().err  # even with --quiet
    assert run(["--resume", str(tmp_path / "again"), "--quiet"]) == result  # reproducible all the same


def test_resume_refuses_another_configuration(tmp_path):
    run(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="--shots 1"):
        run(["--resume", str(tmp_path / "run"), "--shots", "5"])
    with pytest.raises(SystemExit, match="already holds a run"):
        run(TINY + ["--out", str(tmp_path / "run")])


def test_omniglot_small(tmp_path, shared_data):
    result = run(["--dataset", "omniglot", "--data-root", str(shared_data), "--cache-dir", str(tmp_path / "cache"),
                  "--filters", "8", "--tasks", "2", "--inner-steps", "1", "--epochs", "2", "--iters-per-epoch", "2",
                  "--val-tasks", "5", "--test-tasks", "5", "--quiet", "--out", str(tmp_path / "run")])
    assert result["status"] == "finished" and result["epochs_run"] == 2 and len(result["ensemble_epochs"]) == 2


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "maml_gs.py"), *argv], capture_output=True, text=True, cwd=REPO)


def test_help_lists_every_flag():
    out = cli("--help")
    assert out.returncode == 0
    for field in maml_gs.Args.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in out.stdout


@pytest.mark.parametrize("argv, message", [
    (["--ways", "0"], "--ways must be a positive integer"),
    (["--inner-lr", "-1"], "--inner-lr must be positive"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--synthetic-shape", "3,84"], "--synthetic-shape must be three positive integers"),
    (["--shots", "two"], "invalid int value"),
])
def test_impossible_values_are_rejected_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(maml_gs.Args, argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_usage_error_is_a_message_not_a_traceback():
    out = cli("--ways", "0", "--queries", "-1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--ways must be a positive integer" in out.stderr and "--queries must be a positive integer" in out.stderr


def test_ways_above_the_class_count_is_a_clear_error(tmp_path):
    out = cli(*TINY, "--ways", "500", "--out", str(tmp_path / "run"))
    assert out.returncode != 0 and "Traceback" not in out.stderr and "ways" in out.stderr


def test_tensorboard_writes_every_metrics_column_per_epoch(tmp_path, monkeypatch):
    """--tensorboard sends each metrics.csv value to a SummaryWriter on the run directory (a recording stand-in)."""
    calls = []

    class RecordingWriter:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))
        def flush(self):
            pass
        def close(self):
            calls.append(("close",))
    fake = type(sys)("torch.utils.tensorboard")
    fake.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    run(TINY + ["--gs", "--tensorboard", "--out", str(tmp_path / "run")])
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert calls[0] == ("open", str(tmp_path / "run")) and calls[-1] == ("close",)
    logged = {(tag, step): value for tag, value, step in (c for c in calls if len(c) == 3)}
    columns = [key for key in rows[0] if key != "epoch"]
    assert "sigma_lambda" in columns and "val_acc" in columns
    assert len(logged) == len(columns) * len(rows) == len(calls) - 2
    for row in rows:
        for key in columns:
            assert logged[(key, int(row["epoch"]))] == pytest.approx(float(row[key]), rel=1e-6, nan_ok=True)


def test_tensorboard_without_the_package_says_so_and_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    result = run(TINY + ["--epochs", "1", "--tensorboard", "--quiet", "--out", str(tmp_path / "run")])
    assert result["status"] == "finished"
    assert "tensorboard package is not installed (pip install tensorboard)" in capsys.readouterr().err


def test_a_run_made_before_a_resume_free_flag_existed_still_resumes(tmp_path):
    """config.json without --tensorboard (added later; it changes no result) resumes; a missing result flag does not."""
    run(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")])
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    del config["tensorboard"]
    path.write_text(json.dumps(config))
    assert run(["--resume", str(tmp_path / "run"), "--epochs", "1"])["status"] == "finished"
    for flag in common.ADDED_LATER:  # a run made before --backbone: Conv4, as every run was then
        config.pop(flag, None)  # (some are one file's: cml.py's sam_inner, sam_outer)
    path.write_text(json.dumps(config))
    assert run(["--resume", str(tmp_path / "run"), "--epochs", "1"])["status"] == "finished"
    del config["inner_lr"]
    path.write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"made without the arguments \['inner_lr'\]"):
        run(["--resume", str(tmp_path / "run")])


def test_test_queries_set_the_meta_test_tasks_only(tmp_path, monkeypatch):
    built = []
    original = common.EvalTasks

    class Recording(original):
        def __init__(self, split, ways, shots, queries, num_tasks, seed):
            built.append((split.name.split("/")[1], queries))
            super().__init__(split, ways, shots, queries, num_tasks, seed)
    monkeypatch.setattr(common, "EvalTasks", Recording)
    run(TINY + ["--test-queries", "1", "--out", str(tmp_path / "run")])
    assert built == [("val", 2), ("test", 1)]  # TINY has --queries 2


def test_a_run_directory_in_use_is_refused(tmp_path):
    """One writer per run directory: a second run (or resume) while another process holds the lock stops."""
    import fcntl
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running process holds it
        out = subprocess.run([sys.executable, str(REPO / "maml_gs.py"), *TINY, "--out", str(tmp_path / "run")],
                             capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and "is in use by another running process" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "config.json").exists()


def test_resume_takes_the_runs_own_values_and_refuses_a_flag_that_differs(tmp_path):
    """--resume R alone continues with the run's --data-root and every other value; an explicit flag that
    differs from the run's is refused, even when it equals the default."""
    run_dir = tmp_path / "run"
    run(TINY + ["--data-root", str(tmp_path / "elsewhere"), "--epochs", "1", "--out", str(run_dir)])
    (run_dir / "result.json").unlink()
    args = common.resumed_args(*(lambda a: (a, common.given_flags(maml_gs.Args, ["--resume", str(run_dir)])))(
        common.parse_args(maml_gs.Args, ["--resume", str(run_dir)])))
    assert args.data_root == str(tmp_path / "elsewhere") and args.epochs == 1 and args.quiet
    with pytest.raises(SystemExit, match="--epochs 1"):
        run(["--resume", str(run_dir), "--epochs", str(maml_gs.Args().epochs)])  # the default, given explicitly


@pytest.mark.parametrize("flag, value", [("--outer-lr", "inf"), ("--inner-lr", "nan"), ("--seed", str(2 ** 63)),
                                         ("--synthetic-shape", "1,8,8")])
def test_impossible_numbers_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(maml_gs.Args, ["--dataset", "synthetic", flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--tasks", "--val-tasks", "--filters"])
def test_counts_beyond_the_machines_memory_are_usage_errors_with_the_estimate(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(maml_gs.Args, ["--device", "cpu", flag, str(10 ** 9)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "need at least" in err and "GiB of cpu memory" in err and flag in err


def test_the_memory_floor_is_below_what_a_run_allocates():
    """memory_floor is a lower bound: a tiny run's own task batch, first block and Adam exceed it."""
    args = common.parse_args(maml_gs.Args, TINY)
    floor = common.memory_floor(args, common.synthetic_shape(args.synthetic_shape))
    c, h, w = common.synthetic_shape(args.synthetic_shape)
    per_task = args.ways * (args.shots + args.queries)
    batch = max(args.tasks, min(args.eval_batch, args.val_tasks)) * per_task * (c + args.filters) * h * w * 4
    assert batch < floor < batch + 10 * 2 ** 20  # images + first activations, a little for the indices and Conv4
    assert common.memory_floor(replace(args, tasks=2 * args.tasks + args.eval_batch), (c, h, w)) > floor


@pytest.mark.parametrize("message, clean", [("DefaultCPUAllocator: can't allocate memory: you tried 9 bytes", True),
                                            ("some other failure", False)])
def test_running_out_of_memory_is_a_message(tmp_path, monkeypatch, message, clean):
    def exhausted(*args, **kwargs):
        raise RuntimeError(message)
    monkeypatch.setattr(common.TaskSampler, "sample", exhausted)
    with pytest.raises(SystemExit if clean else RuntimeError, match="out of cpu memory" if clean else message):
        run(TINY + ["--out", str(tmp_path / "run"), "--device", "cpu"])


@pytest.mark.parametrize("moment", ["last validation", "meta-test"])
def test_sigterm_during_the_last_validation_or_the_meta_test_saves_and_exits_143(tmp_path, monkeypatch, moment):
    import os
    original, calls = common.evaluate, []

    def evaluate(predicts, tasks, batch_size, between):  # TINY: 3 epochs, so calls 1-3 validate and 4 meta-tests
        calls.append(1)
        if len(calls) == {"last validation": 3, "meta-test": 4}[moment]:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(predicts, tasks, batch_size, between)
    monkeypatch.setattr(common, "evaluate", evaluate)
    with pytest.raises(SystemExit) as exit_info:
        run(TINY + ["--out", str(tmp_path / "run")])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "result.json").exists()
    monkeypatch.undo()
    result = run(["--resume", str(tmp_path / "run"), "--quiet"])
    assert result["status"] == "finished" and result["epochs_run"] == 3 and result["test_acc_ensemble"] is not None

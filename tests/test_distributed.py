"""torch.distributed over tasks (torchrun, srun): N processes compute the one-process meta-iteration and run.

gloo on this CPU, 2 processes started here with torchrun's environment variables: every file's meta-gradient (gradient
sharing's all-reduce inside the inner loop and LWDGH's softmax over all tasks included) equals one process's to 1e-12
in float64; a tiny 2-process run writes the 1-process run's result.json; a 2-process run stopped by a signal resumes
on 1 process and ends as the uninterrupted run; a process count that does not divide --tasks is a message.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
import distributed_worker
import maml_gs

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--ways", "3", "--shots", "1", "--queries", "2",
       "--filters", "3", "--tasks", "4", "--inner-steps", "2", "--iters-per-epoch", "4", "--val-tasks", "5",
       "--test-tasks", "5", "--eval-batch", "3", "--ensemble", "2", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], processes: int = 2) -> list[subprocess.Popen]:
    """`processes` processes of `python argv`, joined as torchrun joins them (its environment variables)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(processes),
           "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(processes)]


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    return [(p.wait(timeout), p.communicate()[1]) for p in procs]


def test_two_processes_compute_the_one_process_meta_gradient_of_every_file(tmp_path):
    out = tmp_path / "two.pt"
    results = finish(start([str(ROOT / "tests" / "distributed_worker.py"), str(out)]))
    assert all(code == 0 for code, _ in results), results
    two, one = torch.load(out), distributed_worker.compute()
    torch.set_default_dtype(torch.float32)
    assert list(two) == list(distributed_worker.CASES)
    for case, steps in one.items():
        for i, (a, b) in enumerate(zip(steps, two[case])):
            assert a["grads"].keys() == b["grads"].keys(), case
            for name in a["grads"]:
                torch.testing.assert_close(b["grads"][name], a["grads"][name], rtol=1e-12, atol=1e-12,
                                           msg=f"{case}, meta-iteration {i + 1}: {name}")
            for k, (ga, gb) in enumerate(zip(a["ghat"] or [], b["ghat"] or [])):
                for name in ga:
                    torch.testing.assert_close(gb[name], ga[name], rtol=1e-12, atol=1e-12, msg=f"{case}: ĝ_{k + 1}")
            for name in a["metrics"]:
                torch.testing.assert_close(b["metrics"][name], a["metrics"][name], rtol=1e-12, atol=1e-12,
                                           msg=f"{case}: {name}")
        assert "m" not in steps[0]["grads"] or steps[1]["grads"]["m"].abs().sum() > 0  # the second iteration's m


def result_numbers(run_dir: Path) -> dict:
    result = json.loads((run_dir / "result.json").read_text())
    return {k: v for k, v in result.items() if k not in ("notes",)}


def assert_same_result(a: dict, b: dict) -> None:
    """The same result.json to rounding: float32 sums over tasks in another order differ in their last bits."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, float):
            assert value == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        else:
            assert value == b[key], key


def test_a_two_process_run_writes_the_one_process_result_and_resumes_on_one_process(tmp_path):
    argv = [str(ROOT / "maml_gs.py"), *RUN, "--gs", "--epochs", "2"]
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the processes: float32 sums over another thread count differ in their
    try:  # last bits, and Adam's step turns such bits of a near-zero gradient into visible changes within epochs
        maml_gs.main(argv[1:] + ["--out", str(one)])
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    results = finish(start(argv + ["--out", str(two)]))
    assert all(code == 0 for code, _ in results), results
    a, b = result_numbers(one), result_numbers(two)
    assert a.keys() == b.keys() and a["ensemble_epochs"] == b["ensemble_epochs"]
    assert_same_result(a, b)
    assert json.loads((two / "config.json").read_text())["processes"] == 2
    assert not list(two.glob("*.tmp"))

    # Stopped by a signal to process 1 alone (process 0 writes): both stop at the same step; 1 process resumes.
    stopped = tmp_path / "stopped"
    procs = start(argv + ["--out", str(stopped)])
    deadline = time.time() + 120
    while not (stopped / common.LAST).exists() and time.time() < deadline:
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs)
    assert [code for code, _ in results] == [128 + signal.SIGTERM] * 2, results
    assert not (stopped / "result.json").exists()  # interrupted before the end
    torch.set_num_threads(1)
    try:
        maml_gs.main(["--resume", str(stopped)])
    finally:
        torch.set_num_threads(threads)
    assert_same_result(a, result_numbers(stopped))


def test_a_dead_process_stops_the_others_with_a_message(tmp_path):
    out = tmp_path / "run"
    procs = start([str(ROOT / "maml_gs.py"), *RUN, "--gs", "--epochs", "2", "--out", str(out), "--process-timeout",
                   "30"])
    deadline = time.time() + 120
    while not (out / common.LAST).exists() and time.time() < deadline:
        time.sleep(0.01)
    procs[1].kill()
    (code, stderr), _ = finish(procs)
    assert code == 1 and "error: process 0 lost the other processes" in stderr and "Traceback" not in stderr, stderr
    assert f"--resume {out}" in stderr and not list(out.glob("*.tmp"))


def test_tasks_not_divisible_by_the_process_count_is_a_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        maml_gs.main([*RUN, "--tasks", "3", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert "--tasks 3 over 2 processes" in str(e.value) and "multiple" in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("env, expected", [
    ({}, (1, 0, 0)),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, (4, 3, 1)),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}, (1, 0, 0)),  # no MASTER_ADDR: not srun's
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "MASTER_ADDR": "node1"}, (8, 5, 1)),
])
def test_the_process_count_comes_from_torchrun_or_srun(monkeypatch, env, expected):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", *common.SLURM_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert common.process_env() == expected


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "two", "RANK": "0"}, {"WORLD_SIZE": "2", "RANK": "2"}])
def test_a_bad_process_environment_is_a_message(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match="error: .*(integers|rank in)"):
        common.process_env()

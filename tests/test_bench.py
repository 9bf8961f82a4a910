"""tools/bench.py times each algorithm file's default path: it must compute what the plain loop computes."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench  # noqa: E402

WAYS, SHOTS, QUERIES, TASKS, FILTERS, STEPS, LR = 3, 2, 2, 3, 4, 2, 0.4
SHAPE = (1, 16, 16)  # the smallest image Conv4's four poolings accept
DTYPE = torch.float64


def tiny_tasks(seed: int = 1, shape=SHAPE, tasks=TASKS, dtype=DTYPE) -> common.Tasks:
    gen = torch.Generator().manual_seed(seed)
    def labels(per_class):
        return torch.arange(WAYS).repeat_interleave(per_class).repeat(tasks, 1)
    return common.Tasks(torch.randn(tasks, WAYS * SHOTS, *shape, generator=gen, dtype=dtype), labels(SHOTS),
                        torch.randn(tasks, WAYS * QUERIES, *shape, generator=gen, dtype=dtype), labels(QUERIES))


@pytest.mark.parametrize("flags", ["", "--vmap on", "--recompute"])
def test_the_benchmarked_maml_path_gives_the_plain_loops_gradients(flags):
    """The timed path (maml_gs.py --no-gs as its command line builds it; '' is the default) = the plain loop."""
    tasks = tiny_tasks()
    step, params = bench.candidate(f"maml_gs.py --no-gs {flags}", tasks, FILTERS, STEPS, LR)
    reference = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    bench.plain_loop(reference, tasks, STEPS, LR)
    result = step()
    assert set(result.grads) == set(reference)
    for name, p in reference.items():
        torch.testing.assert_close(result.grads[name], p.grad, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.skipif(__import__("importlib").util.find_spec("higher") is None, reason="higher not installed")
def test_the_higher_candidate_gives_the_plain_loops_gradients():
    tasks = tiny_tasks()
    plain, reference = bench.candidate(bench.REFERENCE, tasks, FILTERS, STEPS, LR)
    step, params = bench.candidate("higher", tasks, FILTERS, STEPS, LR)
    plain()
    step()
    for name, p in reference.items():
        torch.testing.assert_close(params[name].grad, p.grad, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("label", [f"{label} (MALLOC)" for label in bench.MAML + bench.OTHERS])
def test_every_benchmarked_algorithm_file_runs_and_carries_its_state(label):
    """Each algorithm-file line of the bench runs the file's meta-iteration twice (state carried) with finite
    gradients: a line with a flag its file does not know fails here, not on a GPU."""
    step, _ = bench.candidate(label, tiny_tasks(), FILTERS, STEPS, LR)
    for _ in range(2):
        result = step()
        assert torch.isfinite(result.loss)
        assert all(torch.isfinite(g).all() for g in result.grads.values() if g is not None)


GLIBC = sys.platform == "linux" and __import__("platform").libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="the allocated measure reads glibc's mallinfo2")
def test_bench_measures_the_memory_a_step_allocates():
    size = 32 * 2 ** 20
    allocated, held = bench.peak_memory(lambda: torch.ones(size // 4).sum(), torch.device("cpu"))
    assert size <= allocated < 2 * size and held >= 0


@pytest.mark.skipif(not GLIBC, reason="the allocated measure reads glibc's mallinfo2")
@pytest.mark.parametrize("label", ["maml_gs.py --gs", "lwdgh.py"])
def test_recompute_allocates_at_most_half_of_the_stored_meta_iteration(label):
    tasks = tiny_tasks(shape=(1, 28, 28), tasks=5, dtype=torch.float32)
    stored, _ = bench.candidate(label, tasks, 32, 3, LR)
    recomputed, _ = bench.candidate(f"{label} --recompute", tasks, 32, 3, LR)
    stored(), recomputed()  # warm up
    cpu = torch.device("cpu")
    assert bench.peak_memory(recomputed, cpu)[0] <= 0.5 * bench.peak_memory(stored, cpu)[0]


def test_conv4_forward_is_the_textbook_network():
    """conv -> BatchNorm (batch statistics) -> ReLU -> max-pool per block, then linear, written out here."""
    gen = torch.Generator().manual_seed(0)
    params = common.conv4_init(SHAPE, WAYS, FILTERS, generator=gen, dtype=DTYPE)
    params = {name: p + 0.1 * torch.randn(p.shape, generator=gen, dtype=DTYPE) for name, p in params.items()}
    x = torch.randn(6, *SHAPE, generator=gen, dtype=DTYPE)
    want = x
    for i in range(4):
        want = F.conv2d(want, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding=1)
        mean, var = want.mean((0, 2, 3), keepdim=True), want.var((0, 2, 3), unbiased=False, keepdim=True)
        want = (want - mean) / torch.sqrt(var + 1e-5) * params[f"bn{i}.weight"].view(1, -1, 1, 1) \
            + params[f"bn{i}.bias"].view(1, -1, 1, 1)
        want = F.max_pool2d(torch.relu(want), 2)
    want = want.flatten(1) @ params["head.weight"].T + params["head.bias"]
    torch.testing.assert_close(common.conv4_forward(params, x), want, rtol=1e-12, atol=1e-12)


def test_bench_on_cuda_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cuda"])
    with pytest.raises(SystemExit, match="torch sees no CUDA device"):
        bench.main()


def test_bench_prints_a_table_per_configuration(monkeypatch, capsys):
    """The whole bench, parent and child processes, on a tiny workload (the children read the same module)."""
    monkeypatch.setattr(sys, "argv", ["bench.py", "--configuration", "28x1", "--repeats", "1"])
    monkeypatch.setattr(bench, "MAML", ("maml_gs.py --no-gs",))
    monkeypatch.setattr(bench, "OTHERS", ())
    bench.main()
    out = capsys.readouterr().out
    assert "### 28×28, 1-shot (cpu, median of 1)" in out
    assert "| maml_gs.py --no-gs (MALLOC) |" in out and "| plain loop (as users run it) | " in out


def test_the_launch_configuration_counts_the_aten_operations_of_a_meta_iteration(monkeypatch):
    """The count is of what runs: two elementwise calls are two operations; the loop path's count grows by a
    task's operations with each task, more than the vmap path's (one batched call per operation)."""
    x = torch.ones(3)
    assert bench.operations(lambda: (x + 1) * 2) == 2
    monkeypatch.setattr(bench, "LAUNCH_TASKS", (1, 2, 3))
    lines = bench.launch_counts(torch.device("cpu"))
    rows = {line.split(" | ")[0].lstrip("| "): [int(c.strip(" |").replace(",", "")) for c in line.split(" | ")[1:]]
            for line in lines if line.startswith("| maml_gs.py")}
    assert set(rows) == set(bench.LAUNCH_FILES)
    for sharing in ("--no-gs", "--gs"):
        loop, batched = rows[f"maml_gs.py {sharing} --vmap off"], rows[f"maml_gs.py {sharing} --vmap on"]
        assert loop[2] - loop[1] == loop[1] - loop[0] > 0  # each task its own operations
        assert batched[2] - batched[1] < loop[2] - loop[1]

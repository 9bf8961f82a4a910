"""tools/bench.py times each algorithm file's default path: it must compute what the plain loop computes."""
import sys
from pathlib import Path

import pytest
import torch

import common

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench  # noqa: E402

WAYS, SHOTS, QUERIES, TASKS, FILTERS, STEPS, LR = 3, 2, 2, 3, 4, 2, 0.4
SHAPE = (1, 16, 16)  # the smallest image Conv4's four poolings accept
DTYPE = torch.float64


def tiny_tasks(seed: int = 1) -> common.Tasks:
    gen = torch.Generator().manual_seed(seed)
    def labels(per_class):
        return torch.arange(WAYS).repeat_interleave(per_class).repeat(TASKS, 1)
    return common.Tasks(torch.randn(TASKS, WAYS * SHOTS, *SHAPE, generator=gen, dtype=DTYPE), labels(SHOTS),
                        torch.randn(TASKS, WAYS * QUERIES, *SHAPE, generator=gen, dtype=DTYPE), labels(QUERIES))


def tiny_step(label: str, tasks: common.Tasks):
    return bench.algorithm_step(label, tasks, SHAPE, WAYS, torch.device("cpu"), filters=FILTERS,
                                inner_steps=STEPS, inner_lr=LR, dtype=DTYPE)


@pytest.mark.parametrize("flags", ["", "--vmap on", "--recompute"])
def test_the_benchmarked_maml_path_gives_the_plain_loops_gradients(flags):
    """The timed path (maml_gs.py --no-gs as its command line builds it; '' is the default) = the plain loop."""
    tasks = tiny_tasks()
    algorithm, step = tiny_step(f"maml_gs.py --no-gs {flags}", tasks)
    reference = {name: p.detach().clone().requires_grad_() for name, p in algorithm.params.items()}
    bench.plain_loop(reference, tasks, inner_steps=STEPS, inner_lr=LR)
    result = step()
    assert set(result.grads) == set(reference)
    for name, p in reference.items():
        torch.testing.assert_close(result.grads[name], p.grad, rtol=1e-10, atol=1e-14, msg=name)


ALGORITHM_LINES = sorted({label for plan in bench.CONFIGURATIONS.values() for _, _, labels in plan
                          for label in labels if label.split()[0].endswith(".py")})


@pytest.mark.parametrize("label", ALGORITHM_LINES)
def test_every_benchmarked_algorithm_file_runs_and_carries_its_state(label):
    """Each algorithm-file line of the bench (CPU and CUDA plans) runs the file's meta-iteration twice (state
    carried) with finite gradients: a line with a flag its file does not know fails here, not on a GPU."""
    _, step = tiny_step(label, tiny_tasks())
    for _ in range(2):
        result = step()
        assert torch.isfinite(result.loss)
        assert all(torch.isfinite(g).all() for g in result.grads.values() if g is not None)


GLIBC = sys.platform == "linux" and __import__("platform").libc_ver()[0] == "glibc"
FREED_PROBE = """
import sys, torch, common
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
applied = common.set_malloc(sys.argv[1])
x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
held = rss()
del x
print(applied, (held - rss()) / 2 ** 20)
"""


@pytest.mark.skipif(not GLIBC, reason="--malloc acts on glibc's malloc only")
@pytest.mark.parametrize("setting", ["reuse", "default"])
def test_malloc_reuse_keeps_freed_memory_for_the_next_tensor(setting):
    """--malloc reuse: a freed 64 MiB tensor stays in the process (no munmap, no page faults next time)."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", FREED_PROBE, setting], cwd=root, capture_output=True, text=True,
                         check=True).stdout.split()
    applied, returned_mib = out[0] == "True", float(out[1])
    assert applied == (setting == "reuse")
    if setting == "reuse":
        assert returned_mib < 1, f"{returned_mib:.0f} MiB went back to the system"
    else:
        assert returned_mib > 60, f"only {returned_mib:.0f} MiB went back to the system"


MEMORY_PROBE = """
import sys, time, torch, common
sys.path.insert(0, "tools")
import bench
common.set_malloc("reuse")
kept = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, freed at once: with reuse its memory stays in the process
del kept
def make_and_free():
    x = torch.ones(16 * 2 ** 20 // 4)  # 16 MiB in use, in memory the process already holds
    time.sleep(0.05)  # long enough for the sampler (every ms) to see it
    return float(x.sum())
held, in_use = bench.peak_memory_growth(make_and_free)
print(held / 2 ** 20, in_use / 2 ** 20)
"""


@pytest.mark.skipif(not GLIBC, reason="the allocated measure reads glibc's mallinfo2")
def test_bench_tells_memory_in_use_from_memory_the_allocator_holds():
    """A 16 MiB tensor made in memory kept from an earlier free: 16 MiB allocated, nothing new held."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], cwd=root, capture_output=True, text=True,
                         check=True).stdout.split()
    held_mib, allocated_mib = map(float, out)
    assert 15.5 < allocated_mib < 17, allocated_mib
    assert held_mib < 4, held_mib


@pytest.mark.skipif(not GLIBC, reason="the allocated measure reads glibc's mallinfo2")
def test_recompute_allocates_at_most_half_of_the_stored_inner_loop():
    """--recompute must really drop the inner loop's activations (equal gradients alone cannot show it)."""
    shape, ways, shots, tasks_n = (1, 28, 28), 5, 5, 5
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat_interleave(shots).repeat(tasks_n, 1)
    tasks = common.Tasks(torch.randn(tasks_n, ways * shots, *shape, generator=gen), labels,
                         torch.randn(tasks_n, ways * shots, *shape, generator=gen), labels)
    allocated = {}
    for flags in ("--gs", "--gs --recompute"):  # --malloc default: leave this test process's malloc as it is
        _, step = bench.algorithm_step(f"maml_gs.py {flags} --malloc default", tasks, shape, ways,
                                       torch.device("cpu"), filters=16, inner_steps=4, inner_lr=0.1)
        step()  # warm-up
        allocated[flags] = bench.peak_memory_growth(step)[1]
    assert allocated["--gs --recompute"] < allocated["--gs"] / 2, allocated  # measured: 53 against 165 MiB



def test_op_timer_times_every_operator_call_forward_and_backward():
    import torch.nn.functional as F
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True)
    with bench.OpTimer() as timer:
        F.conv2d(x, w, padding=1).sum().backward()
        F.conv2d(x, w, padding=1)
    assert timer.calls[("convolution", "(2, 3, 8, 8), (4, 3, 3, 3)")] == 2
    assert timer.calls[("convolution_backward", "(2, 4, 8, 8), (2, 3, 8, 8)")] == 1  # the backward is timed too
    assert all(s > 0 for s in timer.seconds.values())
    by_operator = timer.table(by_shape=False)
    assert any(line.endswith(" 2 x  convolution") for line in by_operator), by_operator
    assert len(timer.table(by_shape=True, rows=1)) == 1


def test_profile_tells_the_query_pass_from_the_inner_loop(monkeypatch, capsys):
    """bench.py --profile on a small configuration: every convolution of one meta-iteration, by shape."""
    monkeypatch.setattr(bench, "PROFILE_WARMUP", 1)
    timer = bench.profile("maml_gs.py --no-gs --malloc default", "28", 1, torch.device("cpu"))
    queries, support = bench.WAYS * bench.QUERIES, bench.WAYS * 1
    # The first layer's convolutions of the images. Query pass: one forward of each task's 75 queries. Inner
    # loop: each step's support forward, and in the backward through it (second order) the convolution of the
    # same support images with the gradient of that step's weight gradient.
    assert timer.calls[("convolution", f"({queries}, 1, 28, 28), (48, 1, 3, 3)")] == bench.TASKS
    assert timer.calls[("convolution", f"({support}, 1, 28, 28), (48, 1, 3, 3)")] == 2 * bench.TASKS * bench.INNER_STEPS
    out = capsys.readouterr().out
    assert out.startswith("profile: maml_gs.py --no-gs --malloc default, 1x28x28 1-shot, CPU")
    assert "minor page faults in the profiled meta-iteration" in out and "convolution_backward" in out


def test_bench_rejects_an_unknown_profile_candidate(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--profile", "maml"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert "expected an algorithm file's command line" in capsys.readouterr().err

def hvp(f, x: torch.Tensor, v: torch.Tensor, w: torch.Tensor):
    """(f(x), ∇_x <f(x), w>, ∇_x <∇_x <f(x), w>, v>): values, first and second-order gradients."""
    x = x.detach().requires_grad_()
    y = f(x)
    (g,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return y, g, h


@pytest.mark.parametrize("size", [8, 7])  # 7: the last row and column fall outside every window
def test_max_pool_is_max_pool2d_to_the_second_derivative_ties_included(size):
    """common.max_pool (its CPU path) = F.max_pool2d: values, gradient (which element of a tie gets it), HVP."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, size, size, generator=gen, dtype=DTYPE)
    x[0] = x[0, :, :1, :1]  # sample 0: one value per plane, every window a four-way tie
    x[1] = x[1].relu()  # sample 1: zero ties, as after a ReLU
    v = torch.randn(x.shape, generator=gen, dtype=DTYPE)
    w = torch.randn(3, 4, size // 2, size // 2, generator=gen, dtype=DTYPE)
    ours = hvp(lambda t: common.max_pool(t * t), x, v, w)  # x ↦ max_pool(x²): a non-zero second derivative
    stock = hvp(lambda t: torch.nn.functional.max_pool2d(t * t, 2), x, v, w)
    for a, b in zip(ours, stock):
        assert torch.equal(a, b)
    x.requires_grad_()
    (direct,) = torch.autograd.grad((common.max_pool(x) * w).sum(), x)
    assert direct.count_nonzero() == w.numel()  # one element of each window, ties included, got its gradient


def batch_norm_second_order(batch_norm, x, weight, bias, seed: int = 2):
    """Values, first derivatives, and the derivative of a scalar of the first derivatives w.r.t. (x, γ, β, g)."""
    gen = torch.Generator().manual_seed(seed)
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    y = batch_norm(x, weight, bias)
    g = torch.randn(y.shape, generator=gen, dtype=DTYPE, requires_grad=True)  # ∂L/∂y, itself differentiated
    dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), g, create_graph=True)
    # Every first derivative in the scalar, as in MAML's inner step (dγ, dβ update the fast weights and dx
    # flows on to the convolution), each with its own random cotangent.
    a, a_weight, a_bias = (torch.randn(t.shape, generator=gen, dtype=DTYPE) for t in (dx, dweight, dbias))
    s = (dx * a).sum() + (dweight * a_weight).sum() + (dbias * a_bias).sum() + (dx * dx).sum()
    second = torch.autograd.grad(s, (x, weight, bias, g), allow_unused=True, materialize_grads=True)
    return (y, dx, dweight, dbias), second


def test_batch_norm_is_f_batch_norm_to_the_second_derivative():
    """common.batch_norm (its CPU path): the same kernels as F.batch_norm for values and gradients (bitwise),
    its own second derivative (PyTorch's to rounding), and central finite differences to the second order."""
    gen = torch.Generator().manual_seed(0)
    x = 3 + 2 * torch.randn(4, 3, 5, 6, generator=gen, dtype=DTYPE)  # a mean and scale away from 0 and 1
    weight, bias = torch.randn(3, generator=gen, dtype=DTYPE), torch.randn(3, generator=gen, dtype=DTYPE)
    ours = batch_norm_second_order(common.batch_norm, x, weight, bias)
    stock = batch_norm_second_order(
        lambda t, w, b: torch.nn.functional.batch_norm(t, None, None, w, b, training=True), x, weight, bias)
    for a, b in zip(ours[0], stock[0]):
        assert torch.equal(a, b)
    for name, a, b in zip(("x", "weight", "bias", "g"), ours[1], stock[1]):
        assert (b.abs().max() > 0) == (name != "bias")  # BatchNorm is linear in β: zero for both
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    inputs = (x[:2, :, :3, :3].clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_())
    assert torch.autograd.gradcheck(common.batch_norm, inputs)
    assert torch.autograd.gradgradcheck(common.batch_norm, inputs)


def test_batch_norm_refuses_a_third_derivative():
    x, weight, bias = (torch.randn(shape, dtype=DTYPE, requires_grad=True) for shape in ((2, 3, 4, 4), (3,), (3,)))
    (dx,) = torch.autograd.grad(common.batch_norm(x, weight, bias).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no third derivative"):
        torch.autograd.grad(dx.square().sum(), x, create_graph=True)



def inner_step(w: torch.Tensor, x: torch.Tensor, calls: list) -> torch.Tensor:
    """One gradient step of a tanh regression from w: a function that takes a gradient itself, as inner steps do."""
    calls.append(1)
    loss = torch.tanh(x @ w).sin().sum()
    return w - LR * torch.autograd.grad(loss, w, create_graph=True)[0]


def two_steps(checkpoint, w0: torch.Tensor, x: torch.Tensor, calls: list) -> torch.Tensor:
    w = w0 * 1.0  # not a leaf, like the fast weights
    for _ in range(2):
        w = checkpoint(inner_step, w, x, calls) if checkpoint else inner_step(w, x, calls)
    return torch.tanh(x @ w).square().sum()  # the query loss


def test_checkpoint_gives_the_stored_gradients_running_fn_once_per_pass():
    """common.checkpoint = no checkpointing, to the bit, and to torch.utils.checkpoint: and fn runs once in
    the forward pass (torch's runs it again there, for fn's own gradient), once more per backward."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 3, generator=gen, dtype=DTYPE, requires_grad=True)
    x = torch.randn(7, 5, generator=gen, dtype=DTYPE)
    (stored,) = torch.autograd.grad(two_steps(None, w0, x, []), w0)
    calls = []
    loss = two_steps(common.checkpoint, w0, x, calls)
    assert len(calls) == 2  # once per step: nothing recomputed yet
    (recomputed,) = torch.autograd.grad(loss, w0, retain_graph=True)
    assert len(calls) == 4 and torch.equal(recomputed, stored)
    (again,) = torch.autograd.grad(loss, w0)  # a retained graph: each region recomputed again
    assert len(calls) == 6 and torch.equal(again, stored)
    (second,) = torch.autograd.grad(two_steps(common.checkpoint, w0, x, []).square(), w0, create_graph=True)
    (second_stored,) = torch.autograd.grad(two_steps(None, w0, x, []).square(), w0, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(second.sum(), w0)[0],
                               torch.autograd.grad(second_stored.sum(), w0)[0], rtol=1e-13, atol=0)
    def torch_checkpoint(fn, *args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    (by_torch,) = torch.autograd.grad(two_steps(torch_checkpoint, w0, x, []), w0)
    torch.testing.assert_close(by_torch, stored, rtol=1e-14, atol=0)


@pytest.mark.skipif(not GLIBC, reason="the allocated measure reads glibc's mallinfo2")
def test_checkpoint_keeps_nothing_that_fn_saved_once_fn_returns():
    """What fn's graph saved (two 16 MiB tensors here) is dropped when fn returns; the forward's peak is the
    stored one's, and the backward's at most what the stored graph kept plus its own (measured: 48 and 112 MiB
    against 48 and 32 + 80)."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 4, generator=gen, dtype=DTYPE, requires_grad=True)
    x = torch.randn(2 ** 21 // 4, 64, generator=gen, dtype=DTYPE)  # x @ w: (524288, 4) float64, 16 MiB
    def kept_and_peak(checkpoint):
        before, out = bench.allocated(), {}
        def forward():
            out["w"] = checkpoint(inner_step, w0 * 1.0, x, []) if checkpoint else inner_step(w0 * 1.0, x, [])
        forward_peak = bench.peak_memory_growth(forward)[1]
        kept = bench.allocated() - before
        backward_peak = bench.peak_memory_growth(lambda: torch.autograd.grad(out.pop("w").sum(), w0))[1]
        return kept / 2 ** 20, forward_peak / 2 ** 20, backward_peak / 2 ** 20
    stored, recomputed = kept_and_peak(None), kept_and_peak(common.checkpoint)
    assert stored[0] > 2 * 16 - 1, stored  # the graph holds two (524288, 4) tensors (tanh and sin saved)
    assert recomputed[0] < 1, recomputed  # measured: 32.05 against 0.01 MiB
    assert recomputed[1] < stored[1] + 1 and recomputed[2] < stored[0] + stored[2] + 1, (stored, recomputed)


def test_checkpoint_refuses_a_saved_tensor_modified_in_place():
    """As autograd does without checkpointing: fn's own gradient would read the modified value."""
    w0 = torch.randn(3, 3, dtype=DTYPE, requires_grad=True)
    def modifies(w):
        h = torch.tanh(w)  # tanh saves its output h
        h.mul_(2)
        return torch.autograd.grad(h.sum(), w, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        modifies(w0 * 1.0)
    with pytest.raises(RuntimeError, match="modified in place after it was saved"):
        common.checkpoint(modifies, w0 * 1.0)


def test_checkpoint_refuses_a_function_that_saves_other_tensors_when_rerun():
    w0 = torch.randn(3, 3, dtype=DTYPE, requires_grad=True)
    sizes = iter([4, 5])  # the second run (the recomputation) sees another input size
    def unsteady(w):
        return inner_step(w, torch.ones(next(sizes), 3, dtype=DTYPE), [])
    w = common.checkpoint(unsteady, w0 * 1.0)
    with pytest.raises(RuntimeError, match="must be deterministic"):
        torch.autograd.grad(w.sum(), w0)

def test_conv4_forward_is_the_reference_network_to_the_second_derivative():
    """conv4_forward (max-pool before ReLU, common.max_pool) = Conv4 as the peers write it (bench.py)."""
    gen = torch.Generator().manual_seed(0)
    params = common.conv4_init(SHAPE, WAYS, FILTERS, generator=gen, dtype=DTYPE)
    params = {name: p + 0.1 * torch.randn(p.shape, generator=gen, dtype=DTYPE) for name, p in params.items()}
    x = torch.randn(6, *SHAPE, generator=gen, dtype=DTYPE)
    x[:3, :, 4:12, 4:12] = 0.5  # constant patches: equal activations, ties in the max-pool windows
    v, w = torch.randn(x.shape, generator=gen, dtype=DTYPE), torch.randn(6, WAYS, generator=gen, dtype=DTYPE)
    ours = hvp(lambda t: common.conv4_forward(params, t), x, v, w)
    reference = hvp(lambda t: bench.reference_forward(params, t), x, v, w)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("configuration, quick, full, expected", [
    (None, False, False, {("84", 1), ("28", 1), ("28", 5)}),  # the default bench: under 10 minutes on a CPU
    (None, False, True, {("84", 1), ("28", 1), ("28", 5), ("84", 5)}),
    (None, True, False, {("28", 1), ("28", 5)}),
    (["84x5"], True, False, {("84", 5)}),  # --configuration overrides --quick and --full
    (["28x5", "84x1"], False, False, {("84", 1), ("28", 5)}),
])
def test_bench_runs_the_configurations_asked_for(configuration, quick, full, expected):
    rows = bench.plan("cpu", configuration, quick, full)
    assert {(shape, shots) for shape, shots, _, skip in rows if skip is None} == expected
    assert len(rows) == len(bench.CONFIGURATIONS["cpu"])  # the others are listed as skipped, with the reason


def test_bench_rejects_an_unknown_configuration(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--configuration", "84x3"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert "expected one of 84x1, 28x1, 28x5, 84x5" in capsys.readouterr().err


def test_bench_on_cuda_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cuda"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert "torch sees no CUDA device here" in capsys.readouterr().err


def test_bench_warns_when_a_configuration_may_not_fit_in_memory():
    assert bench.memory_warning("84", 5, available=8.0).startswith("warning: 3x84x84 5-shot needed about 23 GiB")
    assert bench.memory_warning("84", 5, available=30.0) is None
    assert bench.memory_warning("28", 1, available=1.0) is None  # small: no figure, no warning
    assert bench.memory_warning("84", 1, available=None) is None  # MemAvailable unknown (not Linux)
    available = bench.available_gib()
    assert available is None or available > 0

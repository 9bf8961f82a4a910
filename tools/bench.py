"""Benchmark: task sampling, and one meta-iteration against a plain per-task loop and peer libraries.

    python tools/bench.py                    # CPU: all configurations (several minutes on 2 cores)
    python tools/bench.py --device cuda      # on a GPU
    python tools/bench.py --quick            # 28×28 only, fewer repeats

Second-order MAML, Conv4-48, 5 tasks, 5 inner steps, 5-way, 15 queries, synthetic data. For every
configuration, in the same process: this project's `maml_gs.meta_gradient` (with and without gradient
sharing), the plain loop below (`torch.autograd.grad(..., create_graph=True)` per task, the reference),
and `higher` / `torchopt` when installed (requirements-bench.txt; skipped peers are listed). Times are
medians over --repeats after one warm-up; peak memory is CUDA's max allocated, or the process's peak
RSS growth on the CPU; GFLOP counted with torch.utils.flop_counter, shown against a measured matmul peak.
"""
from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import maml_gs  # noqa: E402

WAYS, QUERIES, TASKS, INNER_STEPS, INNER_LR, FILTERS = 5, 15, 5, 5, 0.1, 48
SAMPLING_SHAPE, SAMPLING_SHOTS, SAMPLING_PER_CLASS = (3, 84, 84), 5, 100
MATMUL_SIZE = 4096


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(device: torch.device) -> float:
    """Measured float32 matmul throughput: the ceiling the meta-iteration is compared with."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    seconds = median_seconds(lambda: a @ a, device, repeats=5)
    return 2 * MATMUL_SIZE ** 3 / seconds / 1e9


def bench_sampling(device: torch.device, repeats: int) -> None:
    split = common.load_split("synthetic", "train", synthetic_shape=SAMPLING_SHAPE,
                              synthetic_per_class=SAMPLING_PER_CLASS, verbose=False).to(device)
    sampler = common.TaskSampler(split, WAYS, SAMPLING_SHOTS, QUERIES, TASKS, seed=0)
    seconds = median_seconds(sampler.sample, device, repeats=max(repeats, 20))
    print(f"task sampling, {'x'.join(map(str, SAMPLING_SHAPE))}, {WAYS}-way {SAMPLING_SHOTS}-shot {QUERIES} queries, "
          f"{TASKS} tasks: {seconds * 1e3:.2f} ms per batch, {TASKS / seconds:.0f} tasks/s")
    return seconds


# ---- The reference: a plain per-task loop, as most MAML code is written ----------------------------------

def plain_loop(params: dict[str, torch.Tensor], tasks: common.Tasks) -> None:
    """Second-order MAML, one task at a time; accumulates the meta-gradient into params' .grad."""
    for t in range(tasks.x_s.shape[0]):
        fast = dict(params)
        for _ in range(INNER_STEPS):
            loss = F.cross_entropy(common.conv4_forward(fast, tasks.x_s[t]), tasks.y_s[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {name: w - INNER_LR * g for (name, w), g in zip(fast.items(), grads)}
        (F.cross_entropy(common.conv4_forward(fast, tasks.x_q[t]), tasks.y_q[t]) / tasks.x_s.shape[0]).backward()


def higher_loop(params: dict[str, torch.Tensor], tasks: common.Tasks) -> None:
    """The same with `higher` (innerloop_ctx over an nn.Module holding the same Conv4)."""
    import higher

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.ParameterDict({name.replace(".", "_"): torch.nn.Parameter(v.detach().clone())
                                             for name, v in params.items()})

        def forward(self, x):
            return common.conv4_forward({name: self.p[name.replace(".", "_")] for name in params}, x)

    net = bench_sampling.higher_net = getattr(bench_sampling, "higher_net", None) or Net().to(tasks.x_s.device)
    inner_opt = torch.optim.SGD(net.parameters(), lr=INNER_LR)
    for t in range(tasks.x_s.shape[0]):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(INNER_STEPS):
                diffopt.step(F.cross_entropy(fnet(tasks.x_s[t]), tasks.y_s[t]))
            (F.cross_entropy(fnet(tasks.x_q[t]), tasks.y_q[t]) / tasks.x_s.shape[0]).backward()


def peak_memory(fn, device: torch.device) -> float:
    """MiB: CUDA max allocated during fn, or growth of the process's peak RSS on the CPU (0 if below the old peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2 ** 10


def bench_meta_iteration(device: torch.device, shape: tuple[int, int, int], shots: int, repeats: int,
                         peak: float) -> dict[str, float]:
    gen = torch.Generator(device=device).manual_seed(0)
    def images(n):
        return torch.randn(TASKS, WAYS * n, *shape, generator=gen, device=device)
    def labels(n):
        return torch.arange(WAYS, device=device).repeat_interleave(n).repeat(TASKS, 1)
    tasks = common.Tasks(images(shots), labels(shots), images(QUERIES), labels(QUERIES))
    theta = common.conv4_init(shape, WAYS, FILTERS, generator=torch.Generator().manual_seed(0))
    use_vmap = common.use_vmap("auto", device)
    candidates = {}
    for gs in (False, True):
        params = {name: p.to(device).requires_grad_() for name, p in theta.items()}
        if gs:
            params.update({name: torch.zeros(INNER_STEPS, device=device, requires_grad=True) for name in maml_gs.GS_PARAMS})
        step = lambda params=params: maml_gs.meta_gradient(params, {"ghat": None}, tasks, 0, inner_steps=INNER_STEPS,
                                                           inner_lr=INNER_LR, first_order=False, use_vmap=use_vmap)
        candidates["maml_gs.py --gs" if gs else "maml_gs.py --no-gs"] = step
    plain_params = {name: p.to(device).requires_grad_() for name, p in theta.items()}
    candidates["plain loop"] = lambda: plain_loop(plain_params, tasks)
    skipped = []
    if importlib.util.find_spec("higher"):
        candidates["higher"] = lambda: higher_loop(plain_params, tasks)
    else:
        skipped.append("higher")
    rows = {}
    for name, fn in candidates.items():
        seconds = median_seconds(fn, device, repeats)
        memory = peak_memory(fn, device)
        with FlopCounterMode(display=False) as counter:
            fn()
        gflop = counter.get_total_flops() / 1e9
        rows[name] = (seconds, memory, gflop)
    print(f"\nmeta-iteration, {'x'.join(map(str, shape))}, {WAYS}-way {shots}-shot, {TASKS} tasks, {INNER_STEPS} steps, "
          f"second order, Conv4-{FILTERS}, {device.type}, vmap {'on' if use_vmap else 'off'}")
    print(f"{'':<22}{'s/iter':>9}{'vs plain':>10}{'peak MiB':>10}{'GFLOP':>8}{'GFLOP/s':>9}{'of peak':>9}")
    for name, (seconds, memory, gflop) in rows.items():
        print(f"{name:<22}{seconds:>9.3f}{rows['plain loop'][0] / seconds:>9.2f}x{memory:>10.0f}{gflop:>8.1f}"
              f"{gflop / seconds:>9.1f}{gflop / seconds / peak:>8.1%}")
    if skipped:
        print(f"skipped (not installed; pip install -r requirements-bench.txt): {', '.join(skipped)}")
    return {name: seconds for name, (seconds, _, _) in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="28×28 configurations only, 3 repeats")
    args = parser.parse_args()
    device = common.pick_device(args.device)
    repeats = 3 if args.quick else args.repeats
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}")
    peak = matmul_peak_gflops(device)
    print(f"float32 matmul peak: {peak:.0f} GFLOP/s")
    sample_seconds = bench_sampling(device, repeats)
    shapes = [(1, 28, 28)] if args.quick else [(3, 84, 84), (1, 28, 28)]
    for shape in shapes:
        for shots in (1, 5):
            times = bench_meta_iteration(device, shape, shots, repeats, peak)
            ratio = times["maml_gs.py --no-gs"] / sample_seconds
            print(f"sampling one task batch is {ratio:.0f}x faster than this MAML meta-iteration")


if __name__ == "__main__":
    main()

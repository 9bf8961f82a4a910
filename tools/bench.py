"""Benchmark: task sampling, and one meta-iteration against a plain per-task loop and peer libraries.

    python tools/bench.py                  # CPU: all but 84×84 5-shot (under 10 minutes on 2 cores)
    python tools/bench.py --full           # CPU: every configuration (about 30 minutes on 2 cores)
    python tools/bench.py --device cuda    # on a GPU: every configuration
    python tools/bench.py --quick          # 28×28 only
    python tools/bench.py --configuration 84x5   # one configuration (SHAPExSHOTS), e.g. 84×84 5-shot alone
    python tools/bench.py --profile ["maml_gs.py --no-gs"]   # where one meta-iteration's time goes (84×84 1-shot)

Second-order MAML, Conv4-48, 5 tasks, 5 inner steps, inner lr 0.1, 5-way, 15 queries, synthetic data,
at 84×84×3 (MiniImagenet shape) and 28×28×1 (Omniglot shape), 1 and 5 shots. For every configuration
the same work is done by each candidate: this project's `maml_gs.meta_gradient` with and without
gradient sharing (and with `--recompute`), the plain loop below (`torch.autograd.grad(...,
create_graph=True)` one task at a time: the reference), and `higher` / `torchopt` when installed
(`pip install -r requirements-bench.txt`; the table lists the skipped ones).

The algorithm files are timed as their command lines build them (`make_algorithm`: their default path),
their state carried from one meta-iteration to the next; one line per other algorithm file (Meta-SGD,
MAML++, CML, LWDGH, each with its defaults but the workload above). Each candidate runs in a fresh
process: its first meta-iteration warms up and gives the peak memory in two measures, both above the
process's start: allocated (in use by tensors and objects: on a CPU malloc's bytes in use, glibc's
mallinfo2, sampled every millisecond; CUDA's max allocated memory) and held (taken from the system: on a
CPU the resident memory, which also counts what the allocator keeps after a free; CUDA's max reserved
memory), and, in a second meta-iteration apart (the counter costs memory), the GFLOP (counted by
torch.utils.flop_counter, compared with a measured float32 matmul peak of the device; counted once for
MAML's candidates, which do the same convolutions, and for each candidate that does other work). Then
the candidates take turns: each of --repeats (5) rounds times one meta-iteration of every candidate (in
an order rotated by the round), and a candidate's time is the median of its rounds. On a shared host the
speed drifts by ±20% from one minute to the next; taking turns spreads that drift over all candidates
alike instead of favouring whichever ran in a fast minute. All candidates of a configuration are alive
at once (memory: the sum of their peaks, about 10 GiB at 84×84 1-shot and 23 GiB at 84×84 5-shot on a
CPU; the bench warns before a configuration that may not fit in the available memory).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import maml_gs  # noqa: E402

WAYS, QUERIES, TASKS, INNER_STEPS, INNER_LR, FILTERS = 5, 15, 5, 5, 0.1, 48
SHAPES = {"84": (3, 84, 84), "28": (1, 28, 28)}
SAMPLING_SHAPE, SAMPLING_SHOTS, SAMPLING_PER_CLASS = (3, 84, 84), 5, 100
MATMUL_SIZE = 2048
REFERENCE = "plain loop"
REFERENCE_REUSE = "plain loop, --malloc reuse"  # the reference with the algorithm files' malloc setting
MEMORY_SAMPLE_S = 0.001
PROFILE_ROWS = 15
PROFILE_WARMUP = 3  # meta-iterations before the profiled one: on a CPU the heap (--malloc reuse) settles first
PROFILE_SHAPES = 2  # an operator's calls are grouped by the shapes of its first tensor arguments
# What the two peak-memory columns measure on each device (the table's legend).
ALLOCATED = {"cpu": "malloc's bytes in use, glibc mallinfo2", "cuda": "torch.cuda.max_memory_allocated"}
HELD = {"cpu": "resident memory, with what the allocator keeps after a free", "cuda": "torch.cuda.max_memory_reserved"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device: torch.device) -> float:
    """Wall-clock seconds of one call of fn, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def matmul_peak_gflops(device: torch.device) -> float:
    """Measured float32 matmul throughput: the ceiling the meta-iteration is compared with."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    a @ a
    return 2 * MATMUL_SIZE ** 3 / median_seconds(lambda: a @ a, device, repeats=10) / 1e9


def bench_sampling(device: torch.device) -> float:
    """Seconds to sample one MiniImagenet-shaped task batch on the device."""
    split = common.load_split("synthetic", "train", synthetic_shape=SAMPLING_SHAPE,
                              synthetic_per_class=SAMPLING_PER_CLASS, verbose=False).to(device)
    sampler = common.TaskSampler(split, WAYS, SAMPLING_SHOTS, QUERIES, TASKS, seed=0)
    sampler.sample()
    seconds = median_seconds(sampler.sample, device, repeats=50)
    print(f"task sampling, {'x'.join(map(str, SAMPLING_SHAPE))}, {WAYS}-way {SAMPLING_SHOTS}-shot {QUERIES} queries, "
          f"{TASKS} tasks: {seconds * 1e3:.2f} ms per batch, {TASKS / seconds:.0f} tasks/s")
    return seconds


# ---- The candidates: the same second-order meta-gradient, each its own way ------------------------------

def reference_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Conv4 as MAML code writes it (conv, batch-statistics BN, ReLU, F.max_pool2d; linear head): the peers'
    network. common.conv4_forward computes the same function its own, faster way (tests/test_bench.py)."""
    for i in range(common.conv4_blocks(params)):
        x = F.conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding=common.CONV_KERNEL // 2)
        x = F.batch_norm(x, None, None, params[f"bn{i}.weight"], params[f"bn{i}.bias"], training=True)
        x = F.max_pool2d(F.relu(x), common.POOL)
    return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])


def plain_loop(params: dict[str, torch.Tensor], tasks: common.Tasks, inner_steps: int = INNER_STEPS,
               inner_lr: float = INNER_LR) -> None:
    """The reference: second-order MAML one task at a time, as most MAML code is written; grads into .grad."""
    num_tasks = tasks.x_s.shape[0]
    for t in range(num_tasks):
        fast = dict(params)
        for _ in range(inner_steps):
            loss = F.cross_entropy(reference_forward(fast, tasks.x_s[t]), tasks.y_s[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {name: w - inner_lr * g for (name, w), g in zip(fast.items(), grads)}
        (F.cross_entropy(reference_forward(fast, tasks.x_q[t]), tasks.y_q[t]) / num_tasks).backward()


class Conv4Module(torch.nn.Module):
    """The same Conv4 as an nn.Module, for the peers that patch modules (higher, torchopt)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(params)
        for name, p in params.items():
            self.register_parameter(name.replace(".", "_"), torch.nn.Parameter(p.detach().clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_forward({name: getattr(self, name.replace(".", "_")) for name in self.names}, x)


def higher_loop(net: Conv4Module, tasks: common.Tasks) -> None:
    import higher
    inner_opt = torch.optim.SGD(net.parameters(), lr=INNER_LR)
    for t in range(TASKS):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(INNER_STEPS):
                diffopt.step(F.cross_entropy(fnet(tasks.x_s[t]), tasks.y_s[t]))
            (F.cross_entropy(fnet(tasks.x_q[t]), tasks.y_q[t]) / TASKS).backward()


def torchopt_loop(net: Conv4Module, tasks: common.Tasks) -> None:
    import torchopt
    inner_opt = torchopt.MetaSGD(net, lr=INNER_LR)
    net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt)
    for t in range(TASKS):
        for _ in range(INNER_STEPS):
            inner_opt.step(F.cross_entropy(net(tasks.x_s[t]), tasks.y_s[t]))
        (F.cross_entropy(net(tasks.x_q[t]), tasks.y_q[t]) / TASKS).backward()
        torchopt.recover_state_dict(net, net_state)
        torchopt.recover_state_dict(inner_opt, opt_state)


def algorithm_step(label: str, tasks: common.Tasks, image_shape: tuple[int, int, int], ways: int,
                   device: torch.device, *, filters: int = FILTERS, inner_steps: int = INNER_STEPS, inner_lr: float = INNER_LR,
                   dtype: torch.dtype = torch.float32):
    """An algorithm file's default path, as its command line builds it: (algorithm, one-meta-iteration fn).

    label: "<file>.py [flags]", e.g. "maml_gs.py --gs". The workload flags (ways, shots, tasks, filters,
    inner steps and lr) are the bench's; everything else is the file's default. The function carries the
    algorithm's state from one meta-iteration to the next, as training does (e.g. the stored ĝ).
    """
    file, *flags = label.split()
    module = importlib.import_module(file.removesuffix(".py"))
    argv = ["--dataset", "synthetic", "--synthetic-shape", ",".join(map(str, image_shape)), "--ways", str(ways),
            "--shots", str(tasks.y_s.shape[1] // ways), "--queries", str(tasks.y_q.shape[1] // ways),
            "--tasks", str(tasks.x_s.shape[0]),
            "--filters", str(filters), "--inner-steps", str(inner_steps), "--inner-lr", str(inner_lr),
            "--device", device.type, *flags]
    args = common.parse_args(module.Args, argv)
    common.set_malloc(args.malloc)  # as common.run does: --malloc reuse by default
    algorithm = module.make_algorithm(args, image_shape, device)
    algorithm.params = {name: p.detach().to(dtype).requires_grad_() for name, p in algorithm.params.items()}
    state = [algorithm.state]

    def step() -> common.StepResult:
        result = algorithm.meta_gradient(algorithm.params, state[0], tasks, 0)
        state[0] = result.state
        return result
    return algorithm, step


def make_candidate(name: str, theta: dict[str, torch.Tensor], tasks: common.Tasks, image_shape: tuple[int, int, int],
                   device: torch.device):
    """A no-argument function doing one meta-iteration the named way."""
    if name.split()[0].endswith(".py"):
        return algorithm_step(name, tasks, image_shape, WAYS, device)[1]
    if name in (REFERENCE, REFERENCE_REUSE):
        if name == REFERENCE_REUSE:
            common.set_malloc("reuse")
        params = {n: p.to(device).requires_grad_() for n, p in theta.items()}
        return lambda: plain_loop(params, tasks)
    net = Conv4Module(theta).to(device)
    return lambda: {"higher": higher_loop, "torchopt": torchopt_loop}[name](net, tasks)


# The MAML candidates of every configuration; the other algorithm files get one line each, at 28×28 1-shot.
CANDIDATES = ("maml_gs.py --no-gs", "maml_gs.py --gs", "maml_gs.py --gs --recompute", REFERENCE, "higher", "torchopt")
OTHER_FILES = ("metasgd_gs.py --gs", "mamlpp_gs.py --gs", "cml.py", "lwdgh.py")
# (shape, shots, candidates), in the order run. The other algorithm files get their line at 84×84 1-shot on a
# GPU and at 28×28 1-shot on a CPU, where an 84×84 line costs a minute each.
# On a CPU the plain loop also runs with the algorithm files' --malloc reuse at 84×84, to show what that setting
# alone gives (at 28×28 few tensors are large enough for it to matter, and the bench must stay under 10 minutes).
CPU_CANDIDATES = CANDIDATES + (REFERENCE_REUSE,)
# On CUDA the files' default (--vmap auto) batches the tasks with vmap; their loop path runs beside it, to
# measure what vmap gives there (unmeasured so far: docs/benchmarks.md, GPU).
CUDA_CANDIDATES = CANDIDATES + ("maml_gs.py --no-gs --vmap off", "maml_gs.py --gs --vmap off")
CONFIGURATIONS = {
    "cuda": (("84", 1, CUDA_CANDIDATES + OTHER_FILES), ("84", 5, CUDA_CANDIDATES), ("28", 1, CUDA_CANDIDATES),
             ("28", 5, CUDA_CANDIDATES)),
    "cpu": (("84", 1, CPU_CANDIDATES), ("28", 1, CANDIDATES + OTHER_FILES), ("28", 5, CANDIDATES), ("84", 5, CPU_CANDIDATES)),
}
# On a CPU the 84×84 5-shot configuration alone takes about 20 minutes (6 candidates × 6 meta-iterations of
# about 20 s on 2 cores): it runs with --full only, so that the default bench stays under 10 minutes.
CPU_FULL_ONLY = (("84", 5),)


def plan(device_type: str, configuration: list[str] | None, quick: bool, full: bool) -> list[tuple]:
    """(shape, shots, candidates, why skipped or None) for each configuration, in the order run.

    --configuration SHAPExSHOTS runs exactly those; otherwise --quick skips 84×84, and a CPU without --full
    skips 84×84 5-shot.
    """
    rows = []
    for shape, shots, candidates in CONFIGURATIONS[device_type]:
        if configuration:
            skip = None if f"{shape}x{shots}" in configuration else "not in --configuration"
        elif quick and shape != "28":
            skip = "--quick"
        elif device_type == "cpu" and not full and (shape, shots) in CPU_FULL_ONLY:
            skip = "CPU without --full"
        else:
            skip = None
        rows.append((shape, shots, candidates, skip))
    return rows


# Resident memory of all candidates of a configuration at once, measured on the development CPU (GiB,
# docs/benchmarks.md); the 28×28 configurations need about 3.
CPU_MEMORY_GIB = {("84", 1): 10, ("84", 5): 23}


def available_gib() -> float | None:
    """The memory the kernel says can be allocated without swapping (MemAvailable, GiB); None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) / 2 ** 20  # kB -> GiB
    except (OSError, KeyError, ValueError):
        return None


def memory_warning(shape: str, shots: int, available: float | None) -> str | None:
    """A warning when a CPU configuration needs more memory than is available (its candidates live at once)."""
    need = CPU_MEMORY_GIB.get((shape, shots))
    if need is None or available is None or available >= need:
        return None
    return (f"warning: {'x'.join(map(str, SHAPES[shape]))} {shots}-shot needed about {need} GiB on the development "
            f"machine (all its candidate processes are alive at once) and {available:.1f} GiB are available: it may "
            f"be killed for memory. Free memory, or leave this configuration out (--configuration, without --full).")


def rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (glibc >= 2.33), every field a size_t."""
    _fields_ = [(field, ctypes.c_size_t) for field in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    """glibc's mallinfo2 function, or None (another C library, an older glibc)."""
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


MALLINFO2 = _mallinfo2()


def allocated() -> int | None:
    """Bytes in use through malloc in this process, every arena (glibc): heap chunks in use + mmapped chunks.

    What the process's tensors and objects occupy, without the memory that the allocator keeps after a
    free (fragmentation, --malloc reuse): the CPU counterpart of CUDA's memory_allocated. None off glibc.
    """
    if MALLINFO2 is None:
        return None
    info = MALLINFO2()
    return info.uordblks + info.hblkhd


def peak_memory_growth(fn) -> tuple[int, int | None]:
    """(resident, allocated): bytes by which the process's resident memory, and its memory in use through
    malloc (None off glibc), grew at their highest while fn ran (both sampled every ms).

    The process-lifetime peak (ru_maxrss) cannot be used: importing torch alone reaches a higher peak
    than a small meta-iteration.
    """
    before, before_allocated = rss(), allocated()
    peak, peak_allocated, done = [0], [before_allocated], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            if before_allocated is not None:
                peak_allocated[0] = max(peak_allocated[0], allocated())
            time.sleep(MEMORY_SAMPLE_S)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    grown_allocated = None if before_allocated is None else max(peak_allocated[0], allocated()) - before_allocated
    return max(peak[0], rss()) - before, grown_allocated


def workload(name: str, shape: str, shots: int, device: torch.device):
    """The named candidate's meta-iteration (a no-argument function) on the bench's synthetic task batch."""
    gen = torch.Generator().manual_seed(0)
    def images(n):
        return torch.randn(TASKS, WAYS * n, *SHAPES[shape], generator=gen).to(device)
    def labels(n):
        return torch.arange(WAYS, device=device).repeat_interleave(n).repeat(TASKS, 1)
    tasks = common.Tasks(images(shots), labels(shots), images(QUERIES), labels(QUERIES))
    theta = common.conv4_init(SHAPES[shape], WAYS, FILTERS, generator=torch.Generator().manual_seed(0))
    return make_candidate(name, theta, tasks, SHAPES[shape], device)


def child(name: str, shape: str, shots: int, device: torch.device, count_flops: bool) -> None:
    """Serve one candidate in this (fresh) process, one JSON line per command read from stdin.

    "warm": the first meta-iteration (kernel selection, allocator), which gives the peak memory, and with
    count_flops a second one, which gives the GFLOP (torch.utils.flop_counter slows it down and adds to
    the memory: it is neither timed nor measured). "time": one timed
    meta-iteration. The parent sends "time" to every candidate in turn, so that the candidates share the
    slow and the fast minutes of a shared host alike (tools/bench.py's docstring).
    """
    fn = workload(name, shape, shots, device)
    for command in sys.stdin:
        if command.strip() == "warm":
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                fn()
                held, in_use = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
            else:
                held, in_use = peak_memory_growth(fn)
            gflop = None
            if count_flops:  # one more meta-iteration, apart: the counter's dispatch mode costs memory (~100 MiB)
                with FlopCounterMode(display=False) as counter:
                    fn()
                gflop = counter.get_total_flops() / 1e9
            reply = {"held_mib": held / 2 ** 20, "allocated_mib": None if in_use is None else in_use / 2 ** 20,
                     "gflop": gflop}
        elif command.strip() == "time":
            reply = {"seconds": seconds(fn, device)}
        else:
            return
        print(json.dumps(reply), flush=True)


class OpTimer(TorchDispatchMode):
    """Wall-clock seconds and calls of every aten operator, by operator and the shapes of its first tensors.

    --profile uses it on a CPU instead of torch.profiler, which distorts there: under torch.profiler a
    maml_gs.py meta-iteration at 84×84 1-shot page-faulted 150 000-600 000 times (the profiler's own
    allocations displace the heap that --malloc reuse keeps from one meta-iteration to the next; no fault
    without it), and the operators on the (75, 48, 84, 84) activations showed 5-20× their time. A CPU
    runs each operator when it is called, so the time around the call is the operator's; the timer's own
    cost (Python, per call) adds to the meta-iteration's wall time, not to the operators' times. One
    operator differs under it, as under any dispatch mode: gather's backward (common.max_pool's) scatters
    out of place, one input-sized copy more than without (docs/benchmarks.md).
    """

    def __init__(self):
        super().__init__()
        self.seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)][:PROFILE_SHAPES]
        key = (func.overloadpacket.__name__, ", ".join(map(str, shapes)))
        self.seconds[key] += elapsed
        self.calls[key] += 1
        return out

    def table(self, by_shape: bool, rows: int = PROFILE_ROWS) -> list[str]:
        """The operators that took the most time: share of all operators' time, ms, calls, name (and shapes)."""
        seconds, calls = collections.defaultdict(float), collections.Counter()
        for key, s in self.seconds.items():
            group = key if by_shape else key[:1]
            seconds[group] += s
            calls[group] += self.calls[key]
        total = sum(seconds.values())
        return [f"{s / total:>6.1%} {s * 1e3:>9.1f} ms {calls[group]:>6} x  {'  '.join(group)}"
                for group, s in sorted(seconds.items(), key=lambda item: -item[1])[:rows]]


def minor_faults() -> int:
    """Minor page faults of this process so far: memory touched for the first time since it was mapped."""
    import resource  # POSIX only: imported here, so that the bench's other parts still import elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def profile(name: str, shape: str, shots: int, device: torch.device) -> OpTimer | None:
    """Print where one meta-iteration of the named candidate spends its time, after PROFILE_WARMUP others.

    CPU: OpTimer (by operator, then by operator and input shapes: the 75 queries' tensors tell the query
    pass from the inner loop's), the meta-iteration's time without and with the timer, and its page
    faults (a settled heap has none of its own; the timer's records make about 50 MiB at 84×84). CUDA: torch.profiler, by device time (kernels run asynchronously).
    """
    fn = workload(name, shape, shots, device)
    for _ in range(PROFILE_WARMUP):
        fn()
    plain = seconds(fn, device)
    title = f"profile: {name}, {'x'.join(map(str, SHAPES[shape]))} {shots}-shot"
    if device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            seconds(fn, device)
        print(f"{title}, {torch.cuda.get_device_name(device)}: meta-iteration {plain:.3f} s")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=PROFILE_ROWS))
        return None
    timer, faults = OpTimer(), minor_faults()
    with timer:
        timed = seconds(fn, device)
    faults = minor_faults() - faults
    print(f"{title}, CPU, {torch.get_num_threads()} threads, after {PROFILE_WARMUP} meta-iterations: "
          f"{plain:.3f} s without the timer; {timed:.3f} s with it, of which the operators "
          f"{sum(timer.seconds.values()):.3f} s; {faults} minor page faults in the profiled meta-iteration")
    print("\nby operator (share of the operators' time, ms, calls):")
    print("\n".join(timer.table(by_shape=False)))
    print("\nby operator and the shapes of its first tensor arguments:")
    print("\n".join(timer.table(by_shape=True)))
    return timer


class Candidate:
    """A candidate's server process (child above)."""

    def __init__(self, name: str, shape: str, shots: int, device: str, count_flops: bool):
        self.name = name
        self.stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty child never blocks on it
        self.process = subprocess.Popen([sys.executable, __file__, "--child", name, "--shape", shape, "--shots",
                                         str(shots), "--device", device, *(["--count-flops"] if count_flops else [])],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def ask(self, command: str) -> dict:
        """Send a command, return its JSON reply; RuntimeError with the child's last error line if it died."""
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.process.wait()
            self.stderr.seek(0)
            error = self.stderr.read().strip().splitlines()
            raise RuntimeError(error[-1] if error else f"exit {code}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
            self.process.wait()
        self.stderr.close()


def bench_configuration(shape: str, shots: int, candidates: tuple[str, ...], args, peak_gflops: float) -> dict[str, float]:
    """Run every candidate in its own process, print the table; return seconds per candidate.

    The warm-ups (memory, FLOPs) run one candidate at a time; then round r of --repeats times one
    meta-iteration of every candidate, in an order rotated by r, and each candidate's time is its median.
    """
    rows, skipped, started, running = {}, [], [], []
    try:
        for name in candidates:
            if name in ("higher", "torchopt") and importlib.util.find_spec(name) is None:
                skipped.append(f"{name} (not installed)")
                continue
            # MAML's candidates do the same convolutions and matmuls (gradient sharing adds only elementwise
            # work): their FLOPs are counted once; --recompute and the other algorithm files do different work.
            count = name == candidates[0] or name not in CPU_CANDIDATES or "--recompute" in name
            started.append(Candidate(name, shape, shots, args.device, count))  # all import torch at once
        for candidate in started:  # nothing is timed while processes start and warm up
            try:
                rows[candidate.name] = candidate.ask("warm")
                running.append(candidate)
            except RuntimeError as e:
                skipped.append(f"{candidate.name} (failed: {e})")
                candidate.close()
        times = {c.name: [] for c in running}
        for r in range(args.repeats):
            for candidate in running[r % len(running):] + running[:r % len(running)]:
                try:
                    times[candidate.name].append(candidate.ask("time")["seconds"])
                except RuntimeError as e:
                    skipped.append(f"{candidate.name} (failed: {e})")
                    running.remove(candidate)
                    del rows[candidate.name]
    finally:
        for candidate in started:
            candidate.close()
    for name, r in rows.items():
        r["seconds"] = statistics.median(times[name])
        r["gflop"] = r["gflop"] or rows.get(candidates[0], {}).get("gflop") or float("nan")
    size = "x".join(map(str, SHAPES[shape]))
    print(f"\nmeta-iteration: {size}, {WAYS}-way {shots}-shot, {QUERIES} queries, {TASKS} tasks, {INNER_STEPS} steps, "
          f"second order, Conv4-{FILTERS}; median of {args.repeats}")
    print(f"{'':<30}{'s/iter':>8}{'vs plain':>10}{'vs higher':>10}{'alloc MiB':>10}{'held MiB':>10}{'GFLOP':>8}"
          f"{'GFLOP/s':>9}{'of peak':>9}")
    for name, r in rows.items():
        vs = lambda other: f"{rows[other]['seconds'] / r['seconds']:>9.2f}x" if other in rows else f"{'-':>10}"
        in_use = f"{r['allocated_mib']:>10.0f}" if r["allocated_mib"] is not None else f"{'-':>10}"
        print(f"{name:<30}{r['seconds']:>8.3f}{vs(REFERENCE)}{vs('higher')}{in_use}{r['held_mib']:>10.0f}"
              f"{r['gflop']:>8.1f}{r['gflop'] / r['seconds']:>9.1f}{r['gflop'] / r['seconds'] / peak_gflops:>8.0%}")
    print(f"peak memory of the first meta-iteration, above the process's start; alloc: in use "
          f"({ALLOCATED[args.device]}); held: taken from the system ({HELD[args.device]})")
    if skipped:
        print("skipped: " + ", ".join(skipped))
    return {name: r["seconds"] for name, r in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-iterations per candidate (median)")
    parser.add_argument("--quick", action="store_true", help="28×28 configurations only")
    parser.add_argument("--full", action="store_true",
                        help="on a CPU also 84×84 5-shot (about 20 more minutes on 2 cores); always on a GPU")
    parser.add_argument("--configuration", action="append", metavar="SHAPExSHOTS",
                        help="run only this configuration (repeatable), e.g. 84x5 for 84×84 5-shot; overrides "
                             "--quick and --full")
    parser.add_argument("--profile", nargs="?", const=CANDIDATES[1], metavar="CANDIDATE",
                        help=f"only profile one candidate (default: {CANDIDATES[1]!r}) at 84x84 1-shot (or the first "
                             "--configuration): the operators that take the time")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=tuple(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--shots", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    known = [f"{shape}x{shots}" for shape, shots, _ in CONFIGURATIONS["cpu"]]
    unknown = sorted(set(args.configuration or ()) - set(known))
    if unknown:
        parser.error(f"--configuration {', '.join(unknown)}: expected one of {', '.join(known)} (image side x "
                     "shots, e.g. 84x5)")
    device = common.pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); run it "
                     "on a GPU machine (tools/gpu_check.sh), or use --device cpu")
    args.device = device.type
    if args.child:
        return child(args.child, args.shape, args.shots, device, args.count_flops)
    if args.profile:
        if args.profile not in CPU_CANDIDATES + OTHER_FILES and not args.profile.split()[0].endswith(".py"):
            parser.error(f"--profile {args.profile!r}: expected an algorithm file's command line (e.g. "
                         f"'maml_gs.py --no-gs') or one of: {', '.join(CPU_CANDIDATES[3:])}")
        shape, shots = (args.configuration or ["84x1"])[0].split("x")
        return profile(args.profile, shape, int(shots), device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, vmap over tasks {'on' if common.use_vmap('auto', device) else 'off'}")
    peak = matmul_peak_gflops(device)
    print(f"float32 matmul peak: {peak:.0f} GFLOP/s")
    sample_seconds = bench_sampling(device)
    for shape, shots, candidates, skip in plan(device.type, args.configuration, args.quick, args.full):
        if skip:
            print(f"\n(skipped: {'x'.join(map(str, SHAPES[shape]))} {shots}-shot, {skip})")
            continue
        warning = memory_warning(shape, shots, available_gib()) if device.type == "cpu" else None
        if warning:
            print(warning, flush=True)
        times = bench_configuration(shape, shots, candidates, args, peak)
        if CANDIDATES[0] in times:
            print(f"sampling a task batch is {times[CANDIDATES[0]] / sample_seconds:.0f}x faster than this meta-iteration")


if __name__ == "__main__":
    main()

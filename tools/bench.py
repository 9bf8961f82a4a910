"""Benchmark: one meta-iteration of the algorithm files against a plain per-task loop and `higher`.

    python tools/bench.py                         # CPU: 84×84 and 28×28, 1-shot (under 10 minutes on 2 cores)
    python tools/bench.py --device cuda           # GPU: also 84×84 5-shot, and the loop path beside vmap
    python tools/bench.py --configuration 84x5    # one configuration, SIZExSHOTS
    python tools/bench.py --configuration launch  # per-operation overhead: tiny arithmetic, aten operations counted
    python tools/bench.py --device cuda --busy    # the GPU's busy fraction (kernel time / wall time), default path
    python tools/bench.py --configuration processes  # 84×84 on 1 process × 2 threads against 2 processes × 1 thread

Workload: second-order MAML, Conv4-48, 5 tasks, 5 inner steps, inner lr 0.1, 5-way, 15 queries, synthetic
images. Candidates: the algorithm files (on a CPU at 84×84 MAML's alone: every file's candidate alive at
once would not fit in 24 GiB) as their `main` calls them (`init_params`, `init_state`, then `meta_gradient`
with its state carried on), the plain loop below (per task: K steps of torch.autograd.grad(create_graph=True),
then the query loss's backward) and `higher` (pip install -r requirements-bench.txt; skipped when missing).

On a CPU every candidate also runs with glibc's allocator told to keep freed memory (MALLOC, the setting
the Makefile's CPU targets use): by default glibc maps each allocation above 32 MiB afresh and returns it
when freed, so every meta-iteration page-faults its largest activations in again. "as users run it" is a
peer with the defaults; the setting is applied from the environment and helps every candidate alike.

Each candidate runs in its own process; all are alive at once. The first meta-iteration warms up and gives
the peak memory above the process's start: allocated (tensors: glibc's mallinfo2 sampled every millisecond,
or CUDA's max allocated) and held (taken from the system: the resident memory, or CUDA's max reserved).
Then the candidates take turns: each of --repeats rounds times one meta-iteration of every candidate, in an
order rotated by the round; a candidate's time is its median. A ratio "vs" a peer is the median over the
rounds of the two's times in the same round: a shared host drifts over minutes, and a round's pair sees
the same drift.

--configuration launch: 1×16×16 images, Conv4 of 4 filters (arithmetic negligible), otherwise the same workload:
each meta-iteration is thousands of tiny operations, so its time is the host's cost per operation, which on a GPU
is paid per kernel launch (a CPU's figure is a stand-in for that overhead, never a GPU's time). Candidates:
maml_gs.py without and with sharing, vmap on and off, the plain loop and `higher`; beside each time the number of
aten operations one meta-iteration dispatches (forward and backward, counted with a TorchDispatchMode in a
separate, untimed pass), and the vmap path's count at 1, 5 and 25 tasks.

--configuration processes: torch.distributed over the tasks (gloo, a CPU): maml_gs.py at 84×84, 1-shot, 4 tasks
(2 per process), on 1 process of 2 threads and on 2 processes of 1 thread each (torchrun's environment), each
started afresh in turn; process 0's median time per meta-iteration (the processes start each one together), and
the collectives one meta-iteration dispatches (forward and backward: their count, the bytes sent in, and the
seconds spent inside them, waiting for the other process included), counted in a separate pass.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

WAYS, QUERIES, TASKS, INNER_STEPS, INNER_LR, FILTERS = 5, 15, 5, 5, 0.1, 48
SHAPES = {"84": (3, 84, 84), "28": (1, 28, 28), "16": (1, 16, 16)}
LAUNCH = "launch"  # the configuration of negligible arithmetic: 16x16 images, LAUNCH_FILTERS filters, 1-shot
LAUNCH_FILTERS = 4
LAUNCH_FILES = ("maml_gs.py --no-gs --vmap on", "maml_gs.py --no-gs --vmap off", "maml_gs.py --gs --vmap on",
                "maml_gs.py --gs --vmap off")
LAUNCH_TASKS = (1, 5, 25)  # the vmap path's operation count does not grow with the task batch
MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615"  # never mmap, never trim
REFERENCE = "plain loop"
MAML = ("maml_gs.py --no-gs", "maml_gs.py --gs", "maml_gs.py --gs --recompute")
OTHERS = ("metasgd_gs.py --gs", "mamlpp_gs.py --gs", "cml.py", "cml.py --base sharpmaml",
          "lwdgh.py")  # each with its defaults otherwise (Sharp-MAML: SAM in both loops)
PEERS = (REFERENCE, "higher")
CONFIGURATIONS = {"cpu": ("84x1", "28x1"), "cuda": ("84x1", "84x5", "28x1")}
SAMPLE_S = 0.001
PROCESSES = "processes"  # the configuration of torch.distributed: PROCESS_FILES at 84x1, PROCESS_TASKS tasks
PROCESS_FILES, PROCESS_TASKS, PROCESS_THREADS = ("maml_gs.py --no-gs", "maml_gs.py --gs"), 4, 2


def workload(shape: str, shots: int, device: torch.device, tasks: int = TASKS) -> common.Tasks:
    gen = torch.Generator().manual_seed(0)
    def labels(per_class):
        return torch.arange(WAYS, device=device).repeat_interleave(per_class).repeat(tasks, 1)
    x_s, x_q = (torch.randn(tasks, WAYS * n, *SHAPES[shape], generator=gen).to(device) for n in (shots, QUERIES))
    return common.Tasks(x_s, labels(shots), x_q, labels(QUERIES))


def plain_loop(params: dict[str, torch.Tensor], tasks: common.Tasks, inner_steps: int = INNER_STEPS,
               inner_lr: float = INNER_LR) -> None:
    """Second-order MAML written plainly, one task at a time, as the reference of the comparison: into p.grad.

    As the algorithm files by default, BatchNorm's scale and shift are not adapted in the inner loop."""
    bn = {name: p for name, p in params.items() if name.startswith(common.BN)}
    for t in range(tasks.x_s.shape[0]):
        fast = {name: p for name, p in params.items() if name not in bn}
        for _ in range(inner_steps):
            loss = F.cross_entropy(common.conv4_forward({**fast, **bn}, tasks.x_s[t]), tasks.y_s[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {name: w - inner_lr * g for (name, w), g in zip(fast.items(), grads)}
        loss = F.cross_entropy(common.conv4_forward({**fast, **bn}, tasks.x_q[t]), tasks.y_q[t])
        (loss / tasks.x_s.shape[0]).backward()


def higher_step(params: dict[str, torch.Tensor], tasks: common.Tasks, inner_steps: int, inner_lr: float):
    """The same with `higher` over an nn.Module Conv4 holding a copy of params, as its MAML example runs it.

    Returns the step and the module's parameters by params' names (their .grad: the meta-gradient).
    """
    import higher  # noqa: PLC0415 (optional)

    class Conv4(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = torch.nn.ParameterDict({n.replace(".", "_"): torch.nn.Parameter(p.detach().clone())
                                                   for n, p in params.items()})

        def forward(self, x):
            return common.conv4_forward({n: self.weights[n.replace(".", "_")] for n in params}, x)

    net = Conv4().to(tasks.x_s.device)
    adapted = [p for n, p in net.weights.items() if not n.startswith(common.BN)]  # BN: the outer loop's only
    inner_opt = torch.optim.SGD(adapted, lr=inner_lr)

    def step():
        for t in range(tasks.x_s.shape[0]):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(F.cross_entropy(fnet(tasks.x_s[t]), tasks.y_s[t]))
                (F.cross_entropy(fnet(tasks.x_q[t]), tasks.y_q[t]) / tasks.x_s.shape[0]).backward()
    return step, {n: net.weights[n.replace(".", "_")] for n in params}


def candidate(label: str, tasks: common.Tasks, filters: int = FILTERS, inner_steps: int = INNER_STEPS,
              inner_lr: float = INNER_LR):
    """(step, params): one meta-iteration of `label` on `tasks` as a function, and the meta-parameters it uses.

    An algorithm file's step returns its StepResult; a peer's leaves its meta-gradient in params' .grad.
    """
    device, dtype, ways = tasks.x_s.device, tasks.x_s.dtype, int(tasks.y_s.max()) + 1
    image_shape = tuple(tasks.x_s.shape[2:])
    name = label.removesuffix(" (as users run it)").removesuffix(" (MALLOC)")
    if name in PEERS:
        theta = common.conv4_init(image_shape, ways, filters, generator=torch.Generator().manual_seed(1), dtype=dtype)
        params = {n: p.to(device).requires_grad_() for n, p in theta.items()}
        if name == REFERENCE:
            return (lambda: plain_loop(params, tasks, inner_steps, inner_lr)), params
        return higher_step(params, tasks, inner_steps, inner_lr)
    file, *flags = name.split()
    module = importlib.import_module(file.removesuffix(".py"))
    argv = flags + ["--ways", str(ways), "--shots", str(tasks.y_s.shape[1] // ways), "--queries",
                    str(tasks.y_q.shape[1] // ways), "--tasks", str(tasks.x_s.shape[0]), "--filters", str(filters),
                    "--inner-steps", str(inner_steps), "--inner-lr", str(inner_lr), "--device", device.type]
    args = common.for_device(common.parse_args(module.Args, argv), device)
    params = module.init_params(args, image_shape, device)
    params = {n: p.detach().to(dtype).requires_grad_() for n, p in params.items()}
    state = module.init_state(args)

    def step() -> common.StepResult:
        nonlocal state
        result = module.meta_gradient(params, state, tasks, 0, args)
        state = result.state
        return result
    return step, params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated_bytes() -> int | None:
    """Bytes that glibc's malloc has handed out and not yet been given back (None off glibc)."""
    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    function.restype = Mallinfo2
    info = function()
    return info.uordblks + info.hblkhd


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside it (views included: each is a call a GPU run's host makes)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class CountCollectives(TorchDispatchMode):
    """The torch.distributed collectives dispatched inside it (the functional ones, forward and backward): calls,
    bytes sent in, seconds inside them (their wait included)."""

    def __init__(self):
        super().__init__()
        self.calls, self.bytes, self.seconds = 0, 0, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "_c10d_functional":
            return func(*args, **(kwargs or {}))
        started = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if "wait_tensor" not in func.name():
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            self.calls, self.bytes = self.calls + 1, self.bytes + sum(t.numel() * t.element_size() for t in tensors)
        self.seconds += time.perf_counter() - started
        return out


def process_child(label: str, repeats: int) -> None:
    """One process of the processes configuration: its share of the batch; process 0 prints times and collectives."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    tasks = common.my_share(workload("84", 1, torch.device("cpu"), PROCESS_TASKS))
    step, _ = candidate(label, tasks)
    step()  # warm-up (and the first stored ĝ)
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()  # both processes start the meta-iteration together
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    with CountCollectives() as collectives:
        step()
    if common.process_rank() == 0:
        print(json.dumps({"times": times, "calls": collectives.calls, "bytes": collectives.bytes,
                          "seconds": collectives.seconds}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def processes_table(repeats: int) -> list[str]:
    """1 process × 2 threads against 2 processes × 1 thread, each candidate twice in alternating order."""
    lines = [f"### processes: 84×84, 1-shot, {PROCESS_TASKS} tasks, torch.distributed (gloo, cpu, median of "
             f"{2 * repeats})", "", "| candidate | processes × threads | s / meta-iteration | vs 1 process | "
             "collectives | MiB sent in | s inside collectives |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label in PROCESS_FILES:
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for order in ((1, 2), (2, 1)):
            for count in order:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                env = dict(os.environ, GLIBC_TUNABLES=MALLOC, OMP_NUM_THREADS=str(PROCESS_THREADS // count),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(count))
                procs = [subprocess.Popen([sys.executable, __file__, "--process-child", label, "--repeats",
                                           str(repeats)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                          stdout=subprocess.PIPE, text=True) for r in range(count)]
                outputs = [p.communicate()[0] for p in procs]
                if any(p.returncode for p in procs):
                    raise SystemExit(f"error: the processes configuration's {label} on {count} failed")
                runs[count].append(json.loads(outputs[0]))
        one = statistics.median(t for run in runs[1] for t in run["times"])
        for count, threads in ((1, PROCESS_THREADS), (2, PROCESS_THREADS // 2)):
            run = runs[count][0]
            median = statistics.median(t for r in runs[count] for t in r["times"])
            lines.append(f"| {label} | {count} × {threads} | {median:.3f} | {one / median:.2f}× | {run['calls']} | "
                         f"{run['bytes'] / 2 ** 20:.2f} | {statistics.median(r['seconds'] for r in runs[count]):.3f} |")
    return lines + ["", "vs 1 process: its time over the candidate's. Collectives: one meta-iteration's, forward and "
                    "backward, counted in a separate pass (the seconds include waiting for the other process).", ""]


def operations(step) -> int:
    """aten operations of one call of step(), forward and backward."""
    with CountOps() as counter:
        step()
    return counter.count


def child(label: str, shape: str, shots: int, device: torch.device, filters: int = FILTERS) -> None:
    """Serve the parent: print the warm-up's peak memory (and aten operations), then the seconds of one
    meta-iteration per 'time'."""
    step, _ = candidate(label, workload(shape, shots, device), filters)
    allocated, held = peak_memory(step, device)
    print(json.dumps({"allocated": allocated, "held": held, "ops": operations(step)}), flush=True)
    for line in sys.stdin:
        if line.strip() != "time":
            break
        started = time.perf_counter()
        step()
        sync(device)
        print(time.perf_counter() - started, flush=True)


def peak_memory(step, device: torch.device) -> tuple[int, int]:
    """Bytes (allocated, held) at the peak of step() above those before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = (torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))
        step()
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base[0], torch.cuda.max_memory_reserved(device) - base[1])
    else:
        base, peaks, done = (allocated_bytes() or 0, resident_bytes()), [0, 0], threading.Event()

        def watch():
            while not done.is_set():
                peaks[0], peaks[1] = max(peaks[0], allocated_bytes() or 0), max(peaks[1], resident_bytes())
                time.sleep(SAMPLE_S)
        watcher = threading.Thread(target=watch)
        watcher.start()
        step()
        done.set()
        watcher.join()
        peak = (peaks[0] - base[0], peaks[1] - base[1])
    return peak


def launch_counts(device: torch.device) -> list[str]:
    """The launch configuration's aten operations per meta-iteration at each task batch of LAUNCH_TASKS."""
    shape, shots = LAUNCH_SHAPE
    lines = ["aten operations per meta-iteration by task batch (launch configuration, counted untimed):", "",
             "| candidate | " + " | ".join(f"{t} tasks" for t in LAUNCH_TASKS) + " |",
             "| --- |" + " ---: |" * len(LAUNCH_TASKS)]
    for label in LAUNCH_FILES:
        counts = []
        for tasks in LAUNCH_TASKS:
            step, _ = candidate(label, workload(shape, shots, device, tasks), LAUNCH_FILTERS)
            step()  # the first meta-iteration (no stored ĝ yet) apart: the count of a later one
            counts.append(operations(step))
        lines.append(f"| {label} | " + " | ".join(f"{c:,}" for c in counts) + " |")
    return lines + [""]


LAUNCH_SHAPE = ("16", 1)
BUSY_FILE, BUSY_STEPS = "maml_gs.py --gs", 5  # the default path (vmap on CUDA), meta-iterations profiled


def busy_fraction(device: torch.device) -> list[str]:
    """The GPU's busy fraction on the default path: the CUDA kernels' summed time over the wall time of BUSY_STEPS
    meta-iterations under torch.profiler (its own overhead lengthens the wall: a lower bound), per configuration.
    Near 1: compute-bound; far below: the host's per-launch cost sets the pace (launch-bound)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
    lines = [f"GPU busy fraction of {BUSY_FILE} (vmap on), {BUSY_STEPS} meta-iterations under torch.profiler:", ""]
    for configuration in (LAUNCH, "84x1"):
        shape, shots = LAUNCH_SHAPE if configuration == LAUNCH else configuration.split("x")
        filters = LAUNCH_FILTERS if configuration == LAUNCH else FILTERS
        step, _ = candidate(BUSY_FILE, workload(shape, int(shots), device), filters)
        step()
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            started = time.perf_counter()
            for _ in range(BUSY_STEPS):
                step()
            sync(device)
            wall = time.perf_counter() - started
        kernels = sum(event.self_device_time_total for event in profiler.key_averages()) / 1e6  # µs -> s
        lines.append(f"- {configuration}: kernels {kernels / BUSY_STEPS * 1000:.1f} ms of "
                     f"{wall / BUSY_STEPS * 1000:.1f} ms per meta-iteration: busy {kernels / wall:.0%}")
    return lines + [""]


def configuration_table(configuration: str, device: torch.device, repeats: int) -> list[str]:
    """Start every candidate of one configuration, time them in turns, return the table's lines."""
    launch = configuration == LAUNCH
    shape, shots = LAUNCH_SHAPE if launch else configuration.split("x")
    files = MAML + OTHERS if device.type == "cuda" or shape != "84" else MAML  # all alive at once: CPU memory
    labels = [f"{label} (MALLOC)" for label in files + PEERS] if device.type == "cpu" else list(files + PEERS)
    if launch:  # tiny tensors: the allocator setting changes nothing
        labels = list(LAUNCH_FILES + PEERS)
    elif device.type == "cpu":
        labels += [f"{peer} (as users run it)" for peer in PEERS]
    else:
        labels += ["maml_gs.py --no-gs --vmap off", "maml_gs.py --gs --vmap off"]
    if importlib.util.find_spec("higher") is None:
        labels = [label for label in labels if not label.startswith("higher")]
    processes, memory = {}, {}
    for label in labels:
        env = dict(os.environ, **({"GLIBC_TUNABLES": MALLOC} if "(MALLOC)" in label else {}))
        processes[label] = subprocess.Popen(
            [sys.executable, __file__, "--child", label, "--configuration", configuration, "--device", device.type],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        memory[label] = json.loads(processes[label].stdout.readline())  # its warm-up, one process at a time
    times = {label: [] for label in labels}
    for round_ in range(repeats):
        for label in labels[round_ % len(labels):] + labels[:round_ % len(labels)]:
            processes[label].stdin.write("time\n")
            processes[label].stdin.flush()
            times[label].append(float(processes[label].stdout.readline()))
    for process in processes.values():
        process.stdin.close()
        process.wait()
    median = {label: statistics.median(values) for label, values in times.items()}
    as_users = next((p for p in ("higher (as users run it)", "higher") if p in times), None)

    def paired(peer: str | None, label: str) -> str:  # the median over rounds of the peer's time over the label's
        return f"{statistics.median(p / t for p, t in zip(times[peer], times[label])):.2f}×" if peer else "—"

    def ratio(peer: str, label: str) -> str:  # against the peer with the same allocator setting
        return paired(next((p for p in labels if p.startswith(peer) and ("(MALLOC)" in p) == ("(MALLOC)" in label)),
                           None), label)
    mib = 2 ** 20
    if launch:
        stand_in = "; a stand-in for per-launch overhead, not a GPU figure" if device.type == "cpu" else ""
        lines = [f"### launch: {SHAPES[shape][1]}×{SHAPES[shape][2]}, {LAUNCH_FILTERS} filters, {shots}-shot "
                 f"({device.type}, median of {repeats}{stand_in})",
                 "", "| candidate | ms / meta-iteration | vs plain loop | vs higher | aten operations |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {label} | {1000 * median[label]:.1f} | {ratio(REFERENCE, label)} | {ratio('higher', label)} | "
                  f"{memory[label]['ops']:,} |" for label in labels]
        return lines + ["", "vs: the median over the rounds of the peer's time over the candidate's in the same "
                        "round.", ""] + launch_counts(device)
    lines = [f"### {SHAPES[shape][1]}×{SHAPES[shape][2]}, {shots}-shot ({device.type}, median of {repeats})", "",
             "| candidate | s / meta-iteration | vs plain loop | vs higher | vs higher as users run it | "
             "allocated MiB | held MiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label in labels:
        lines.append(f"| {label} | {median[label]:.3f} | {ratio(REFERENCE, label)} | {ratio('higher', label)} | "
                     f"{paired(as_users, label)} | {memory[label]['allocated'] / mib:.0f} | "
                     f"{memory[label]['held'] / mib:.0f} |")
    return lines + ["", "vs: the median over the rounds of the peer's time over the candidate's in the same round, "
                    "the peer with the same allocator setting.", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--configuration", action="append", help="SIZExSHOTS, e.g. 84x1, or launch (repeatable)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of turns; each candidate's median counts")
    parser.add_argument("--busy", action="store_true", help="the GPU's busy fraction on the default path (CUDA)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--process-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.process_child:
        return process_child(args.process_child, args.repeats)
    device = common.pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    if args.child:
        if args.configuration[0] == LAUNCH:
            return child(args.child, *LAUNCH_SHAPE, device, LAUNCH_FILTERS)
        shape, shots = args.configuration[0].split("x")
        return child(args.child, shape, int(shots), device)
    machine = common.provenance(device)
    print(f"# tools/bench.py: {machine['machine']}, torch {torch.__version__}, commit {machine['commit']}\n")
    if args.busy:
        if device.type != "cuda":
            raise SystemExit("error: --busy measures a GPU's kernel time: run it with --device cuda on a GPU")
        print("\n".join(busy_fraction(device)))
        return None
    print(f"MALLOC: GLIBC_TUNABLES={MALLOC}\n" if device.type == "cpu" else "", end="")
    started = time.time()
    for configuration in args.configuration or CONFIGURATIONS[device.type]:
        table = processes_table(args.repeats) if configuration == PROCESSES else configuration_table(
            configuration, device, args.repeats)
        print("\n".join(table), flush=True)
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()

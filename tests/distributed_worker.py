"""Two meta-iterations of every algorithm file in float64, on this process's share of a task batch.

Run by tests/test_distributed.py twice: in the test's own process (one process: the reference) and as N processes
of a gloo group started with torchrun's environment variables (`python tests/distributed_worker.py OUT`), whose
process 0 saves what they computed to OUT. The two must agree to 1e-12: N processes compute the one-process
meta-gradient, gradient sharing's all-reduced Σ_t ∇L_t and LWDGH's softmax over all tasks included.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `import common`
import common  # noqa: E402

TASKS, STEPS = 4, 2  # 2 tasks per process with 2 processes
IMAGES = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--ways", "3", "--shots", "1", "--queries", "2",
          "--filters", "3", "--inner-lr", "0.3"]
SINUSOID = ["--dataset", "sinusoid", "--shots", "3", "--queries", "2"]
CASES = {  # name: (file, flags); the GS ones run twice, so that the second uses the first's stored ĝ (and m a gradient)
    "maml --gs vmap": ("maml_gs", ["--gs", "--vmap", "on"]),  # the GPU's default path (a CPU's: the loop)
    "maml --gs --recompute": ("maml_gs", ["--gs", "--recompute"]),  # the loop path; the backward recomputes
    # the all-reduce
    "maml --no-gs sinusoid": ("maml_gs", ["--no-gs", *SINUSOID]),
    "metasgd --gs": ("metasgd_gs", ["--gs"]),
    "mamlpp --gs --clip-grad 0.01": ("mamlpp_gs", ["--gs", "--clip-grad", "0.01"]),
    "cml --base maml (g_meta, g_co apart)": ("cml", ["--base", "maml", "--gamma", "0.7"]),
    "cml --base sharpmaml": ("cml", ["--base", "sharpmaml", "--sam-inner", "0.05", "--sam-outer", "0.05"]),
    "lwdgh exploit": ("lwdgh", ["--no-ee", "--clip-grad", "0"]),
    "lwdgh explore": ("lwdgh", ["--p-min", "1", "--p-max", "1", "--clip-grad", "0"]),
}


def batch(args: common.Args, seed: int) -> common.Tasks:
    """The whole batch, the same in every process (as every process's sampler draws it); float64."""
    gen = torch.Generator().manual_seed(seed)
    if args.dataset in common.REGRESSION:
        return common.sinusoid_tasks(TASKS, args.shots, args.queries, gen)
    def labels(n):
        return torch.arange(args.ways).repeat_interleave(n).repeat(TASKS, 1)
    return common.Tasks(torch.randn(TASKS, args.ways * args.shots, 1, 16, 16, generator=gen), labels(args.shots),
                        torch.randn(TASKS, args.ways * args.queries, 1, 16, 16, generator=gen), labels(args.queries))


def compute() -> dict[str, list[dict]]:
    """Per case, two meta-iterations' meta-gradients, stored state and metrics (of the whole batch)."""
    torch.set_default_dtype(torch.float64)
    out = {}
    for name, (program, flags) in CASES.items():
        module = importlib.import_module(program)
        argv = (flags if "--dataset" in flags else IMAGES + flags) + ["--tasks", str(TASKS), "--inner-steps",
                                                                     str(STEPS)]
        args = common.for_device(common.parse_args(module.Args, argv), torch.device("cpu"))
        shape = common.SINUSOID_SHAPE if args.dataset in common.REGRESSION else (1, 16, 16)
        params = {n: p.detach().double().requires_grad_() for n, p in
                  module.init_params(args, shape, torch.device("cpu")).items()}
        state, steps = module.init_state(args), []
        for i in range(2):
            tasks = batch(args, seed=i)
            tasks = common.Tasks(*(x.double() if x.is_floating_point() else x for x in tasks))
            result = module.meta_gradient(params, state, common.my_share(tasks), 0, args)
            state.update(result.state)
            metrics = {k: torch.as_tensor(v) for k, v in result.metrics.items()
                       if k.startswith(("gci", "weight", "grad_"))}
            steps.append({"grads": {n: g for n, g in result.grads.items() if g is not None}, "ghat": state.get("ghat"),
                          "metrics": metrics})  # the batch's (loss and score: Run's mean over processes)
        out[name] = steps
    return out


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    results = compute()
    if torch.distributed.get_rank() == 0:
        torch.save(results, sys.argv[1])
    torch.distributed.destroy_process_group()
